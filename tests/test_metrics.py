"""The metrics file contract, the console line, FLOPs / peak tables, and the TensorBoard / W&B loggers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from megatron.training import metrics
from megatron.training.metrics import (
    Loggers,
    MetricsWriter,
    flatten_scalars,
    format_eval_line,
    format_log_line,
    missing_contract_keys,
    model_flops_per_token,
    peak_flops,
    peak_flops_for_name,
    throughput_metrics,
)


def make_record(iteration: int, loss: float = 2.5, **extra) -> dict:
    record = {
        "iteration": iteration, "loss": loss, "lr": 3e-4, "grad_norm": 1.25, "skipped": 0,
        "step_time_s": 0.125, "tokens_per_s": 16384.0,
        "memory": {"num_params": 1000, "weight_bytes": 1000, "grad_bytes": 1000, "master_bytes": 2000,
                   "optim_bytes": 3000, "state_bytes_per_param": 7.0},
        "comm": {"dp_bytes": 10, "tp_bytes": 20, "pp_bytes": 0},
    }
    record.update(extra)
    return record


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writer_appends_one_flushed_json_line_per_record(tmp_path):
    path = tmp_path / "run" / "logs" / "metrics.jsonl"  # parents are created
    writer = MetricsWriter(path, enabled=True)
    writer.write(make_record(1, fp8={"mu": 1.0, "overflow_frac": 0.0, "underflow_frac": 0.0}))
    assert read_lines(path)[0]["fp8"] == {"mu": 1.0, "overflow_frac": 0.0, "underflow_frac": 0.0}  # on disk before close
    writer.write(make_record(2, loss=torch.tensor(2.25), grad_norm=np.float32(0.5), skipped=np.int64(1)))
    writer.close()
    records = read_lines(path)
    assert [r["iteration"] for r in records] == [1, 2]
    assert (records[1]["loss"], records[1]["grad_norm"], records[1]["skipped"]) == (2.25, 0.5, 1)
    assert records[1]["memory"]["state_bytes_per_param"] == 7.0
    with MetricsWriter(path, enabled=True) as again:  # a second writer appends
        again.write(make_record(3))
    assert [r["iteration"] for r in read_lines(path)] == [1, 2, 3]


def test_disabled_writer_touches_nothing(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    for writer in (MetricsWriter(path, enabled=False), MetricsWriter(None, enabled=True)):
        writer.write({"iteration": 1})  # not even checked: other ranks may pass partial records
        writer.close()
    assert not (tmp_path / "sub").exists()


def test_non_finite_values_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path, enabled=True) as writer:
        writer.write(make_record(1, loss=float("nan"), grad_norm=float("inf"), fp8={"mu": 1.0, "overflow_frac": -math.inf, "underflow_frac": 0.0}))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert (record["loss"], record["grad_norm"], record["fp8"]["overflow_frac"]) == (None, None, None)


@pytest.mark.parametrize(
    "change, missing",
    [
        (lambda r: r.pop("loss"), ["loss"]),
        (lambda r: r["memory"].pop("grad_bytes"), ["memory.grad_bytes"]),
        (lambda r: r.pop("comm"), ["comm"]),
        (lambda r: r.update(fp8={"mu": 1.0}), ["fp8.overflow_frac", "fp8.underflow_frac"]),
        (lambda r: (r.pop("step_time_s"), r["comm"].pop("pp_bytes")), ["step_time_s", "comm.pp_bytes"]),
    ],
)
def test_contract_keys_are_checked(tmp_path, change, missing):
    record = make_record(4)
    change(record)
    assert missing_contract_keys(record) == missing
    with MetricsWriter(tmp_path / "metrics.jsonl", enabled=True) as writer:
        with pytest.raises(ValueError, match="misses contract keys: " + ", ".join(missing)):
            writer.write(record)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_unloggable_values_are_refused():
    with pytest.raises(ValueError, match="record.loss is a tensor of 2 elements"):
        metrics.to_json_value(make_record(1, loss=torch.ones(2)))
    with pytest.raises(ValueError, match="record.note has type object"):
        metrics.to_json_value({"note": object()})


def test_resume_drops_the_iterations_about_to_be_redone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path, enabled=True) as writer:
        for iteration in range(1, 11):
            writer.write(make_record(iteration))
    with open(path, "a") as handle:
        handle.write('{"iteration": 11, "lo')  # torn by a crash
    path.chmod(0o640)
    with MetricsWriter(path, enabled=True, resume_from_iteration=5) as writer:
        assert [r["iteration"] for r in read_lines(path)] == [1, 2, 3, 4, 5]
        writer.write(make_record(6))
    assert [r["iteration"] for r in read_lines(path)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o640
    MetricsWriter(tmp_path / "fresh.jsonl", enabled=True, resume_from_iteration=3).close()  # no file yet: fine
    assert (tmp_path / "fresh.jsonl").read_text() == ""


def test_a_fresh_run_starts_the_file_afresh_and_appending_survives_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(make_record(1)) + "\n" + '{"iteration": 2, "lo')
    with MetricsWriter(path, enabled=True) as writer:  # appending: the earlier lines stay
        writer.write(make_record(3))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["iteration"] == 3
    with MetricsWriter(path, enabled=True, resume_from_iteration=0) as writer:
        writer.write(make_record(1, loss=9.0))
    assert read_lines(path) == [json.loads(json.dumps(make_record(1, loss=9.0)))]


def test_log_line_shows_megatron_fields():
    record = make_record(20, train_iters=100, consumed_samples=640, global_batch_size=32,
                         tflops_per_device=123.45, mfu_percent=41.7, skipped=2, elapsed_s=125.4, eta_s=183_600.0,
                         loss_scale=65536.0,
                         fp8={"mu": 0.5, "overflow_frac": 1.5e-6, "underflow_frac": 2e-3})
    line = format_log_line(record)
    for expected in ("iteration       20/     100", "consumed samples:          640",
                     "elapsed time per iteration (ms): 125.0", "learning rate: 3.000000E-04",
                     "global batch size:    32", "lm loss: 2.500000E+00", "grad norm: 1.250",
                     "tokens/s: 16,384", "TFLOP/s/device: 123.5", "MFU: 41.7%", "number of skipped iterations:   2",
                     "fp8 mu: 0.5", "fp8 overflow: 1.50e-06", "fp8 underflow: 2.00e-03",
                     "elapsed: 0:02:05", "ETA: 51:00:00", "loss scale: 65536.0"):
        assert expected in line, (expected, line)
    plain = format_log_line(make_record(3, loss=float("nan"), grad_norm=None))
    assert "lm loss: nan" in plain and "grad norm: nan" in plain
    assert "MFU" not in plain and "fp8" not in plain and "/" not in plain.split("|")[0]
    assert "ETA" not in plain and "loss scale" not in plain
    assert format_eval_line(10, 2.0) == (" validation loss at iteration 10 | lm loss value: 2.000000E+00 | "
                                         f"lm loss PPL: {math.exp(2.0):.6E} |")


def test_progress_gives_elapsed_time_and_eta_from_the_mean_iteration_time():
    now = [100.0]
    progress = metrics.Progress(start_iteration=40, train_iters=100, clock=lambda: now[0])
    assert progress.metrics(40) == {"elapsed_s": 0.0, "eta_s": None}  # nothing done yet: no estimate
    now[0] = 130.0  # 10 iterations in 30 s: 3 s each, 50 to go
    assert progress.metrics(50) == {"elapsed_s": 30.0, "eta_s": 150.0}
    now[0] = 280.0
    assert progress.metrics(100) == {"elapsed_s": 180.0, "eta_s": 0.0}
    assert [metrics.format_duration(x) for x in (0, 59.6, 3600, 90061, float("nan"))] == [
        "0:00:00", "0:01:00", "1:00:00", "25:01:01", "?"]


def test_flops_per_token_by_hand():
    # L=2, h=64, f=256, a=4 heads in g=2 groups (key/value width 32), s=128, V=1000:
    # QKV 2*64*(64+2*32) = 16384, scores+context 4*128*64 = 32768, projection 2*64*64 = 8192,
    # GeLU MLP 4*64*256 = 65536 -> 122880 per layer; logits 2*64*1000 = 128000;
    # forward 2*122880 + 128000 = 373760; training 3x = 1121280.
    gelu = model_flops_per_token(2, 64, 256, 4, 2, 128, 1000, swiglu=False)
    assert gelu == 1121280
    # SwiGLU adds a third h x f GEMM: 2*(2*64*256) more per layer forward, times 3 for training.
    assert model_flops_per_token(2, 64, 256, 4, 2, 128, 1000, swiglu=True) == gelu + 3 * 2 * 2 * 64 * 256
    # Megatron's closed form: 12 L h^2 (1 + g/a + s/h + f/h + V / (2 L h)).
    assert gelu == pytest.approx(12 * 2 * 64**2 * (1 + 2 / 4 + 128 / 64 + 256 / 64 + 1000 / (2 * 2 * 64)))
    assert model_flops_per_token(2, 64, 256, 4, None, 128, 1000, False) == model_flops_per_token(
        2, 64, 256, 4, 4, 128, 1000, False)
    with pytest.raises(ValueError, match="seq_length must be >= 1"):
        model_flops_per_token(2, 64, 256, 4, 2, 0, 1000, False)


@pytest.mark.parametrize(
    "name, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H200", "fp8", 1978.9),
        ("NVIDIA GH200 480GB", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp8", None),
        ("NVIDIA L40S", "fp8", 733.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA H100 80GB HBM3", "fp32", None),
        ("Some Future Accelerator", "bf16", None),
    ],
)
def test_peak_table(name, dtype, tflops):
    expected = None if tflops is None else pytest.approx(tflops * 1e12)
    assert peak_flops_for_name(name, dtype) == expected


def test_peak_on_cpu_and_bad_dtype():
    assert peak_flops(torch.device("cpu"), "bf16") is None
    assert peak_flops("cpu", "fp8") is None
    with pytest.raises(ValueError, match="dtype 'int4'"):
        peak_flops("cpu", "int4")
    result = throughput_metrics(tokens_per_s=1e6, flops_per_token=6e8, num_devices=2, peak_flops_per_device=1e15)
    assert result == pytest.approx({"tflops_per_device": 300.0, "mfu_percent": 30.0})
    assert throughput_metrics(1e6, 6e8, 2, None) == pytest.approx({"tflops_per_device": 300.0})


def test_flatten_makes_one_series_per_leaf():
    scalars = flatten_scalars(make_record(7, skipped=True, note="text", fp8={"mu": torch.tensor(0.5), "overflow_frac": None}))
    assert "iteration" not in scalars and "note" not in scalars and "fp8/overflow_frac" not in scalars
    assert scalars["memory/weight_bytes"] == 1000.0 and scalars["comm/tp_bytes"] == 20.0
    assert scalars["skipped"] == 1.0 and scalars["fp8/mu"] == 0.5


def test_tensorboard_scalars_are_readable_under_megatrons_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_config = {"lr": 3e-4, "num_layers": 2, "params_dtype": torch.bfloat16, "data_path": [tmp_path / "corpus"]}
    with Loggers(tensorboard_dir=str(tmp_path / "tb"), run_config=run_config) as loggers:
        assert loggers.active
        for iteration in (1, 2, 3):
            loggers.log(make_record(iteration, loss=3.0 - iteration, consumed_samples=32 * iteration,
                                    global_batch_size=32, loss_scale=2.0 ** 16), iteration)
        loggers.log({"val_loss": 1.5}, 3, samples=96)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # Megatron-LM's tags (its dashboards read these), the "vs samples" ones against consumed samples
    upstream = {"lm loss", "learning-rate", "batch-size", "grad-norm", "loss-scale", "iteration-time",
                "lm loss validation", "lm loss vs samples", "learning-rate vs samples", "batch-size vs samples",
                "grad-norm vs samples", "loss-scale vs samples", "lm loss validation vs samples"}
    assert upstream <= tags, upstream - tags
    assert {"memory/weight_bytes", "comm/dp_bytes", "tokens_per_s"} <= tags  # the rest as before
    assert not {"loss", "lr", "grad_norm", "val_loss", "global_batch_size"} & tags
    assert [(e.step, e.value) for e in events.Scalars("lm loss")] == [(1, 2.0), (2, 1.0), (3, 0.0)]
    assert [(e.step, e.value) for e in events.Scalars("lm loss vs samples")] == [(32, 2.0), (64, 1.0), (96, 0.0)]
    assert [(e.step, e.value) for e in events.Scalars("lm loss validation vs samples")] == [(96, 1.5)]
    assert [e.value for e in events.Scalars("learning-rate")] == pytest.approx([3e-4] * 3)
    assert [e.value for e in events.Scalars("iteration-time")] == [0.125] * 3
    assert "config" in str(events.Tags()["tensors"])  # the run's flags, as a text summary


def test_upstream_names_follow_the_tasks_loss():
    scalars = metrics.upstream_scalars(make_record(1, val_loss=2.0), loss_name="response loss")
    assert scalars["response loss"] == 2.5 and scalars["response loss validation"] == 2.0
    assert scalars["grad-norm"] == 1.25 and scalars["memory/num_params"] == 1000.0


def test_loggers_without_backends_or_off_rank_do_nothing(tmp_path):
    with Loggers() as loggers:
        assert not loggers.active
        loggers.log(make_record(1), 1)
    Loggers(tensorboard_dir=str(tmp_path / "tb"), enabled=False).close()
    assert not (tmp_path / "tb").exists()
    with pytest.raises(ValueError, match="--wandb-mode 'cloud': choose one of online, offline, disabled"):
        Loggers(wandb_mode="cloud")


@pytest.mark.parametrize("package, flag", [("wandb", "wandb_project"), ("tensorboard", "tensorboard_dir")])
def test_missing_backend_package_is_named(monkeypatch, tmp_path, package, flag):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))
    for enabled in (True, False):  # every rank fails alike, not only the one that logs
        with pytest.raises(ValueError, match=f"needs the {package} package: pip install {package}"):
            Loggers(**{flag: str(tmp_path / "x")}, enabled=enabled)


def test_wandb_login_trouble_is_one_clear_line(monkeypatch, tmp_path):
    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login(key=...)")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=refuse))
    monkeypatch.setattr(metrics, "_require_package", lambda *args: None)
    with pytest.raises(ValueError, match=r"^W&B could not start a run \(api_key not configured \(no-tty\)\); "
                                         r"run `wandb login`, or log offline with --wandb-mode offline$"):
        Loggers(tensorboard_dir=str(tmp_path / "tb"), wandb_project="p", run_config=argparse.Namespace(lr=0.1))
    assert list((tmp_path / "tb").iterdir())  # TensorBoard's event file was closed, not lost


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    save_dir = tmp_path / "wandb-save"
    with Loggers(wandb_project="fp8-lm-test", wandb_exp_name="unit", wandb_save_dir=str(save_dir),
                 wandb_mode="offline", run_config={"lr": 3e-4}) as loggers:
        for iteration in (1, 2):
            loggers.log(make_record(iteration), iteration)
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
