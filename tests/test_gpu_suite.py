"""bench/gpu_suite.py --dry-run on CPU: every section runs and records finite numbers, so the
script is known to work before a GPU is at hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _numbers(x, where=""):
    """(path, value) for every number in the JSON, and every string that spells a non-finite one."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(x, bool):
        return
    elif isinstance(x, (int, float)):
        yield where, x
    elif isinstance(x, str) and x.lower() in ("nan", "inf", "-inf"):
        yield where, float(x)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "suite.json"
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, out.parent


def test_every_section_ok_and_finite(suite):
    data, stdout, _ = suite
    assert data["meta"]["dry_run"] is True and data["meta"]["command"].startswith("python bench/gpu_suite.py")
    results = data["results"]
    assert set(results) == {"environment", "step_audit", "gemm", "sqnr", "casts", "fp8_linear", "gpt"}
    for name, r in results.items():
        assert r["ok"], (name, r.get("error"), r.get("traceback"))
        assert r["skipped_cases"] == 0 and r["budget_s"] > 0
        assert f"== {name} " in stdout  # a table per section
    bad = [(w, v) for w, v in _numbers(results) if not math.isfinite(v)]
    assert not bad, bad


def test_gemm_and_linear_rows(suite):
    results = suite[0]["results"]
    gemm = results["gemm"]["rows"]
    assert {(r["op"], r["size"]) for r in gemm} == {(op, s) for op in ("bf16", "tensorwise", "rowwise", "blockwise")
                                                    for s in (64, 128)}
    for r in gemm:
        assert r["ok"] and r["seconds"] > 0 and r["tflops"] > 0, r
        assert r["op"] == "bf16" or r["speedup_vs_bf16"] > 0
    assert {r["path"] for r in gemm if r["op"] == "tensorwise"} == {"scaled_mm"}  # torch._scaled_mm on CPU
    linear = results["fp8_linear"]["rows"]
    assert {r["recipe"] for r in linear} == {"bf16", "delayed", "current", "rowwise", "blockwise"}
    assert {r["in_features"] for r in linear} == {32, 64, 128}
    for r in linear:
        assert r["ok"] and r["seconds"] > 0 and r["tflops"] > 0, r
        # The layer's own linears, trained as O1-O3 train them.
        h = r["in_features"]
        assert r["shapes"] == [f"qkv {h}x{3 * h}", f"proj {h}x{h}", f"fc1 {h}x{4 * h}", f"fc2 {4 * h}x{h}"]
        assert r["micro_batches"] == 2 and r["fp8_wgrad"] == (r["recipe"] != "bf16")
    # The recommendation is the crossover of these very rows.
    from bench.gpu_suite import crossover
    assert results["fp8_linear"]["fp8_min_features"] == crossover(linear)
    assert set(results["fp8_linear"]["fp8_min_features"]) == {"delayed", "current", "rowwise", "blockwise"}
    assert results["fp8_linear"]["fused_casts"] is False  # auto: fused on CUDA only


def test_casts_fused_against_eager(suite):
    casts = suite[0]["results"]["casts"]
    assert [r["granularity"] for r in casts["rows"]] == ["tensor", "row", "block"]
    for r in casts["rows"]:
        assert r["ok"] and r["bit_identical"] and r["eager_ms"] > 0 and r["fused_ms"] > 0, r
    assert casts["all_bit_identical"] is True


def test_calibration_file_is_what_the_trainer_reads(suite):
    from fp8.calibration import load

    data, stdout, folder = suite
    calibration = load(folder / "fp8_calibration-dryrun.json")
    linear = data["results"]["fp8_linear"]
    assert calibration.widths == (32, 64, 128) and calibration.min_features == linear["fp8_min_features"]
    record = json.loads((folder / "fp8_calibration-dryrun.json").read_text())
    assert record["micro_batches"] == 2 and record["fp8_wgrad"] is True and len(record["shapes"]) == 4
    for recipe, width in linear["fp8_min_features"].items():
        assert calibration.threshold(recipe) == (129 if width is None else width)
    assert "--fp8-calibration" in stdout


def test_crossover_is_the_narrowest_width_from_which_fp8_always_wins():
    from bench.gpu_suite import crossover

    def rows(recipe, speedups):
        return [{"recipe": recipe, "in_features": w, "ok": s is not None, "speedup_vs_bf16": s or 0}
                for w, s in speedups.items()]
    table = (rows("bf16", {1024: None}) + rows("a", {1024: 0.8, 2048: 1.1, 4096: 1.3, 8192: 1.5})
             + rows("b", {1024: 1.2, 2048: 0.9, 4096: 1.1, 8192: 1.4})   # a dip: only from 4096 on
             + rows("c", {1024: 0.5, 2048: 0.6, 4096: 0.7, 8192: 0.9})   # never
             + rows("d", {1024: 1.1, 2048: 1.2, 4096: 1.3, 8192: None}))  # the widest failed: no claim
    assert crossover(table) == {"a": 2048, "b": 4096, "c": None, "d": None}


def test_sqnr_sane(suite):
    rows = suite[0]["results"]["sqnr"]["rows"]
    assert [r["scaling"] for r in rows] == ["tensorwise", "rowwise", "blockwise"]
    for r in rows:
        assert r["ok"] and r["finite"], r
        # E4M3 on random normal inputs: about 28-29 dB against the float64 product of the inputs
        assert 20 < r["sqnr_vs_f64_db"] < 45, r
        assert 20 < r["cpu_emulation_sqnr_vs_f64_db"] < 45, r
        # against float64 of the same FP8 operands only the output rounding remains
        assert r["sqnr_vs_exact_f64_db"] > 45, r
        assert r["sqnr_vs_cpu_emulation_db"] > 45, r


def test_gpt_levels(suite):
    gpt = suite[0]["results"]["gpt"]
    assert gpt["config"]["num_layers"] == 2 and gpt["flops_per_token"] > 0
    assert set(gpt["levels"]) == {"none", "O0", "O2", "O3"}
    for level, r in gpt["levels"].items():
        assert r["ok"], (level, r.get("error"))
        assert r["steps_run"] == 2 and r["step_time_s"] > 0 and r["tokens_per_s"] > 0, r
        for key in ("mfu_percent", "mfu_vs_bf16_peak_percent", "peak_memory_bytes", "tflops", "num_params"):
            assert key in r  # MFU and CUDA peak memory are None on CPU (no peak FLOP/s, no CUDA allocator)
        assert all(math.isfinite(x) for x in r["losses"])
        assert level == "none" or r["fp8_layers"] > 0
    assert len({r["num_params"] for r in gpt["levels"].values()}) == 1


def test_step_audit_counts_each_level(suite):
    """The step audit's dispatch counts: FP8 levels launch more than none, the syncs are the
    step's loss read (with the FP8 reduction's statistics at O1+) and the gradient norm's, at
    every level; on the CPU there are no device counts."""
    audit = suite[0]["results"]["step_audit"]
    levels = audit["levels"]
    assert set(levels) == {"none", "O0", "O3"}
    for level, row in levels.items():
        assert row["ok"] and row["dispatched_launches"] > 0 and row["cuda_kernels"] is None, (level, row)
    assert levels["O3"]["dispatched_launches"] > levels["none"]["dispatched_launches"]
    assert levels["none"]["dispatched_syncs"] == levels["O0"]["dispatched_syncs"] == levels["O3"]["dispatched_syncs"] >= 2
