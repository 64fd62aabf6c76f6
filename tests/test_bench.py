"""The benchmark scripts run and save what they print (their figures are not asserted: speed is
measured by the benchmarks, never by tests)."""

import json

import pytest

from bench import fp8_ops


@pytest.mark.slow
def test_fp8_ops_bench_writes_its_table_as_json(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert fp8_ops.main(["--device", "cpu", "--sizes", "128", "--iters", "1", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    ops = {row["op"] for row in saved["rows"]}
    assert {"quantize[tensor] eager", "quantize[block] fused", "matmul bf16", "fp8_matmul[tensor] scaled_mm",
            "fp8_matmul[tensor] emulate", "fp8_matmul[block] emulate", "nn.Linear bf16 fwd+bwd",
            "FP8Linear blockwise eager fwd+bwd", "FP8Linear blockwise fused fwd+bwd"} <= ops
    # The fused casts' bytes are the eager ones'.
    checked = [row["same_bytes_as_eager"] for row in saved["rows"] if "same_bytes_as_eager" in row]
    assert len(checked) == 3 and all(checked)
    assert all(row["seconds"] > 0 for row in saved["rows"])
    assert saved["meta"]["torch"] and "bench/fp8_ops.py" in saved["meta"]["command"]
    printed = capsys.readouterr().out
    assert "fp8_matmul[row] emulate" in printed and str(out) in printed


def test_fp8_ops_bench_refuses_a_missing_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert fp8_ops.main(["--device", "cuda"]) == 2
    assert "no GPU is visible" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_autoscaling_bench_compares_the_three_scalings_on_real_gradients(builtin_corpus_small, tmp_path):
    from bench import autoscaling
    from fp8.autoscale import GradientAutoScaler

    out = tmp_path / "autoscaling.json"
    iters = 3
    assert autoscaling.main(["--iters", str(iters), "--samples", "0", str(iters), "--seq-length", "32",
                             "--micro-batch-size", "1", "--data-path", str(builtin_corpus_small.data_prefix),
                             "--tokenizer-model", str(builtin_corpus_small.tokenizer_model),
                             "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert "bench/autoscaling.py" in saved["meta"]["command"] and saved["meta"]["machine"]
    rows = {row["method"]: row for row in saved["rows"]}
    assert set(rows) == {"input", "pre", "post", "auto"}
    assert rows["pre"]["mu"] == 1 / 8 and rows["post"]["mu"] == 1.0
    for row in [*saved["rows"], *(t[m] for t in saved["per_tensor"] for m in ("pre", "post", "auto"))]:
        for key in ("overflow_frac", "underflow_frac"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0, (row, key)
    assert len(saved["per_tensor"]) == 8  # qkv, proj, fc1, fc2 of both layers

    trajectory = saved["trajectory"]
    assert [s["iteration"] for s in trajectory] == list(range(iters + 1))
    # The auto-scaler was driven by its own reductions' overflow: replaying them gives the same mu.
    replay = GradientAutoScaler(ratio=1e-5, window=20)
    for step, mu in zip(trajectory, saved["mu_trajectory"]):
        assert step["auto"]["mu"] == pytest.approx(replay.mu, rel=1e-12) and mu == step["auto"]["mu"]
        replay.update(step["auto"]["overflow_frac"])
    assert saved["auto_final_mu"] == pytest.approx(replay.mu, rel=1e-12) and 0 < replay.mu <= 2
    # On the same gradients: dividing by 8 first never saturates (each value <= 448/8, so 8 sum to
    # at most 448) but flushes most; summing first saturates (real gradients agree in sign where
    # they are largest). Auto's mu lies between, and so do its fractions.
    for step in trajectory:
        pre, post, auto = step["pre"], step["post"], step["auto"]
        assert pre["overflow_frac"] == 0.0 and pre["underflow_frac"] >= post["underflow_frac"]
        if 1 / 8 <= auto["mu"] <= 1:
            assert post["overflow_frac"] >= auto["overflow_frac"]
            assert pre["underflow_frac"] >= auto["underflow_frac"] >= post["underflow_frac"]
    assert trajectory[0]["post"]["overflow_frac"] > 1e-5 and trajectory[0]["auto"] == trajectory[0]["post"]
    assert rows["post"]["overflow_frac"] > rows["pre"]["overflow_frac"] == 0.0
    assert rows["pre"]["underflow_frac"] > rows["post"]["underflow_frac"]
    # The reduction's own error is a re-rounding: far above zero, and the overflowing one is worse.
    assert rows["pre"]["sqnr_vs_fp8_in_db"] > 20 and rows["pre"]["sqnr_db"] > rows["post"]["sqnr_db"]
    assert set(saved["samples"]) == {"0", str(iters)}


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_cpu(tmp_path, capsys):
    """The GPU check's script, at tiny sizes on the CPU, so it does not rot between GPU runs:
    every section runs, per-tensor GEMMs go to _scaled_mm and equal the emulation, the collectives
    return their input at one rank, and every level trains close to `none`."""
    from bench import gpu_check
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert all(section["ok"] for section in results.values()), {k: v.get("error") for k, v in results.items()}
    per_tensor = [c for c in results["gemm_correctness"]["cases"] if c["scaling"] == "tensor" and c["ok"]]
    assert per_tensor and all(c["rel_err_vs_cpu_emulation"] == 0.0 for c in per_tensor if c["path"] == "scaled_mm")
    assert results["nccl"]["all_ok"]
    levels = results["training"]["levels"]
    assert all(abs(levels[name]["last20_rel_vs_none"]) < 0.02 for name in levels if name != "none")
    assert levels["O3"]["losses"] == levels["O2"]["losses"]  # O3 takes O2's steps at one rank
    assert "level" in capsys.readouterr().out


def test_fp8_optim_bench_times_both_paths_and_checks_their_bits(tmp_path, capsys):
    from bench import fp8_optim

    out = tmp_path / "optim.json"
    assert fp8_optim.main(["--hidden", "32", "--layers", "2", "--warmup", "1", "--iters", "1", "--chunk-numel", "1024",
                           "--foreach-numel", "0", "4096", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["states"], r["foreach"]) for r in rows} == {("o2", False), ("o2", True), ("fp32", False), ("fp32", True)}
    assert all(r["same_bits"] and r["seconds"] > 0 for r in rows)
    if not __import__("torch").cuda.is_available():
        assert fp8_optim.main(["--device", "cuda"]) == 2
        assert "no GPU is visible" in capsys.readouterr().err
