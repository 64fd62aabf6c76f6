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
    assert {"quantize[tensor]", "matmul bf16", "fp8_matmul[tensor] scaled_mm", "fp8_matmul[tensor] emulate",
            "fp8_matmul[block] emulate", "nn.Linear bf16 fwd+bwd", "FP8Linear blockwise fwd+bwd"} <= ops
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
