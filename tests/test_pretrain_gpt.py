"""pretrain_gpt.py end to end: validation errors, training at none and O0, and a torchrun launch
with tensor + sequence parallelism writing the metrics file of DESIGN.md."""

import json
import os
import subprocess
import sys

import pytest

import pretrain_gpt
from megatron.training.config import parse_config
from megatron.training.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu"]
# Smaller and shorter than the demo so that the suite stays fast.
FAST = ["--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--log-interval", "5", "--eval-interval", "1000", "--eval-iters", "0"]



def run_main(argv, monkeypatch, world_size=None):
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    return run_cli(lambda: pretrain_gpt.main(argv))


@pytest.mark.parametrize("extra,world,message", [
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible"),
    (["--tensor-model-parallel-size", "8", "--num-attention-heads", "4"], 8, "--num-attention-heads (4) must be divisible"),
    (["--tensor-model-parallel-size", "2", "--group-query-attention", "--num-query-groups", "1"], 2,
     "--num-query-groups (1) must be divisible"),
    (["--num-query-groups", "2"], 1, "takes effect only with --group-query-attention"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "127",
      "--max-position-embeddings", "127"], 2, "--seq-length (127) must be divisible"),
    (["--micro-batch-size", "4", "--global-batch-size", "12"], 2, "--global-batch-size (12) must be a multiple"),
    (["--seq-length", "256"], None, "exceeds --max-position-embeddings"),
    (["--fp8-level", "O2", "--fp8-reduce-scatter"], None, "--fp8-reduce-scatter needs --fp8-level O3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "--num-layers"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1",
      "--micro-batch-size", "4", "--global-batch-size", "4"], 2, "multiple of --pipeline-model-parallel-size"),
    (["--no-such-flag"], None, "unrecognized arguments: --no-such-flag"),
    (["--data-path", "/nonexistent/corpus_text_document"], None, "/nonexistent/corpus_text_document"),
    (["--loss-plot", "x.png"], None, "--loss-plot needs --metrics-file"),
])
def test_validation_errors_exit_2_with_one_line(extra, world, message, builtin_corpus_small, monkeypatch, capsys):
    code = run_main(TINY + builtin_corpus_small.training_args() + extra, monkeypatch, world)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_yaml_errors_and_overrides(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nhidden_sise: 64\n")
    assert run_main(["--config", str(bad)], monkeypatch) == 2
    assert "unknown key 'hidden_sise'" in capsys.readouterr().err
    assert run_main(["--config", str(tmp_path / "missing.yaml")], monkeypatch) == 2
    assert "no such file" in capsys.readouterr().err
    # Flags override the file.
    args = parse_config(TINY + ["--hidden-size", "256", "--data-path", "x"])
    assert (args.hidden_size, args.num_layers, args.lr) == (256, 2, 3.0e-3)


def test_vocab_padding_per_tensor_parallel_rank():
    args = parse_config(TINY + ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "128"])
    assert args.model.padded_vocab_size(1000, 2) == 1024
    assert args.model.padded_vocab_size(1025, 2) == 1280


def test_user_errors_have_no_traceback_in_a_real_process(builtin_corpus_small):
    env = dict(os.environ, WORLD_SIZE="3")
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY, *builtin_corpus_small.training_args(),
                           "--tensor-model-parallel-size", "2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: world size 3")


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_o0_trains_within_a_few_percent_of_none(builtin_corpus_small, tmp_path, monkeypatch):
    finals = {}
    for level in ("none", "O0"):
        metrics = tmp_path / f"{level}.jsonl"
        argv = TINY + FAST + builtin_corpus_small.training_args() + [
            "--train-iters", "60", "--lr-warmup-iters", "5", "--fp8-level", level, "--metrics-file", str(metrics)]
        assert run_main(argv, monkeypatch) == 0
        records = read_metrics(metrics)
        assert [r["iteration"] for r in records] == list(range(5, 61, 5))
        assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it learns
        finals[level] = sum(r["loss"] for r in records[-2:]) / 2
    assert abs(finals["O0"] - finals["none"]) / finals["none"] < 0.03, finals


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_tensor_and_sequence_parallel(builtin_corpus_small, tmp_path):
    metrics, plot = tmp_path / "metrics.jsonl", tmp_path / "loss.png"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "pretrain_gpt.py", *TINY, *FAST, *builtin_corpus_small.training_args(),
               "--train-iters", "20", "--tensor-model-parallel-size", "2", "--sequence-parallel",
               "--fp8-level", "O0", "--metrics-file", str(metrics), "--loss-plot", str(plot),
               "--tensorboard-dir", str(tmp_path / "tb")]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(metrics)
    assert [r["iteration"] for r in records] == [5, 10, 15, 20]
    last = records[-1]
    for key in ("iteration", "loss", "lr", "grad_norm", "skipped", "step_time_s", "tokens_per_s"):
        assert key in last
    memory = last["memory"]
    # FP32 weights are the master: 4 (weight) + 4 (grad) + 8 (Adam) bytes, half of them per TP rank;
    # O0's linears cast their weights to FP8 where they use them and keep no copy.
    held = memory["weight_bytes"] + memory["grad_bytes"] + memory["master_bytes"] + memory["optim_bytes"]
    assert memory["master_bytes"] == 0 and memory["grad_bytes"] == memory["weight_bytes"]
    assert "fp8_weight_cache_bytes" not in memory
    assert memory["state_bytes_per_param"] == pytest.approx(held / memory["num_params"])
    assert 7.5 < memory["state_bytes_per_param"] < 8.75
    assert last["comm"]["tp_bytes"] > 0 and last["comm"]["dp_bytes"] == 0 and last["comm"]["pp_bytes"] == 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard, on rank 0
