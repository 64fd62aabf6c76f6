"""--attention-backend: Megatron-LM's values mapped onto PyTorch's attention kernels; those that
cannot run here are refused with one line before training."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import pretrain_gpt
from megatron.training.attention_backend import ATTENTION_BACKENDS, attention_context, check_attention_backend
from megatron.training.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--hidden-size", "64",
         "--ffn-hidden-size", "256", "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "4",
         "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
         "--fp8-min-features", "32", "--train-iters", "2", "--lr-warmup-iters", "0"]


def test_upstream_values_and_what_runs_on_this_cpu():
    assert ATTENTION_BACKENDS == ("auto", "flash", "fused", "unfused", "local")
    cpu = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=16)
    for name in ("auto", "unfused", "local"):
        check_attention_backend(name, dropout=0.1, **cpu)
    check_attention_backend("flash", dropout=0.0, **cpu)  # PyTorch has a CPU flash kernel, without dropout
    with pytest.raises(ValueError, match="--attention-backend flash cannot run here .*takes no dropout"):
        check_attention_backend("flash", dropout=0.1, **cpu)
    with pytest.raises(ValueError, match="--attention-backend fused cannot run here .*exist on CUDA only"):
        check_attention_backend("fused", dropout=0.0, **cpu)


def test_unfused_is_the_reference_kernel_and_masks_pass():
    query, key, value = (torch.randn(2, 4, 8, 16, dtype=torch.float64) for _ in range(3))
    scores = (query @ key.transpose(-1, -2)) / 4.0
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value
    for name in ("unfused", "local", "auto"):
        with attention_context(name):
            torch.testing.assert_close(F.scaled_dot_product_attention(query, key, value, is_causal=True), expected)
            torch.testing.assert_close(F.scaled_dot_product_attention(query, key, value, attn_mask=mask), expected)


def test_a_kernel_missing_later_is_one_line_too():
    with pytest.raises(ValueError, match="^--attention-backend flash: PyTorch has no such kernel"):
        with attention_context("flash"):
            raise RuntimeError("No available kernel. Aborting execution.")
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not the flag's
        with attention_context("flash"):
            raise RuntimeError("something else")


@pytest.mark.slow
def test_training_with_each_backend_that_runs_here(builtin_corpus_small, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    losses = {}
    for name in ("auto", "unfused", "flash"):
        metrics = tmp_path / f"{name}.jsonl"
        argv = SMALL + builtin_corpus_small.training_args() + ["--attention-backend", name,
                                                              "--metrics-file", str(metrics)]
        assert run_cli(lambda: pretrain_gpt.main(argv)) == 0
        losses[name] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert losses["unfused"] == pytest.approx(losses["auto"], rel=1e-5)
    assert losses["flash"] == pytest.approx(losses["auto"], rel=1e-5)
    capsys.readouterr()
    argv = SMALL + builtin_corpus_small.training_args() + ["--attention-backend", "fused"]
    assert run_cli(lambda: pretrain_gpt.main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --attention-backend fused cannot run here (cpu"), err
