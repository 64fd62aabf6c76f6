"""--fp16: FP16 parameters over FP32 masters with Megatron-LM's loss scaling. The scaler's rules,
the optimizer wrapper's unscale / clip / skip, and training runs: close to FP32, an overflow
skips and halves the scale (without moving the learning-rate schedule), and a resume restores
the scaler exactly."""

from __future__ import annotations

import json
import math
import os

import pytest

import pretrain_gpt
from megatron.core.optimizer import Optimizer, OptimizerConfig
from megatron.core.optimizer.grad_scaler import LossScaledOptimizer, LossScaler, LossScalerConfig
from megatron.training.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A smaller model than gpt-tiny.yaml's: FP16 GEMMs are slow on CPUs.
SMALL = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--hidden-size", "64",
         "--ffn-hidden-size", "256", "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "4",
         "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
         "--fp8-min-features", "32", "--lr-warmup-iters", "2"]


def run(argv, monkeypatch, tmp_path, name: str) -> list[dict]:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    metrics = tmp_path / f"{name}.jsonl"
    assert run_cli(lambda: pretrain_gpt.main(argv + ["--metrics-file", str(metrics)])) == 0
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_dynamic_scale_follows_megatrons_rules():
    scaler = LossScaler(LossScalerConfig(initial_scale=1024.0, min_scale=256.0, growth_interval=3, hysteresis=2))
    scales = []
    for found_inf in (True, True, True, False, False, False, True, True, True, True):
        scaler.update(found_inf)
        scales.append(scaler.scale)
    # hysteresis 2: the first overflow only counts, the second halves, and every further one while
    # the counter stays spent; 3 clean steps double and restore the hysteresis; never below 256
    assert scales == [1024, 512, 256, 256, 256, 512, 512, 256, 256, 256]
    state = scaler.state_dict()
    assert state == {"scale": 256.0, "growth_tracker": 0, "hysteresis_tracker": -2}
    again = LossScaler(LossScalerConfig(initial_scale=1024.0, min_scale=256.0, growth_interval=3, hysteresis=2))
    again.load_state_dict(state)
    assert again.state_dict() == state
    constant = LossScaler(LossScalerConfig(constant_scale=128.0))
    constant.update(True)
    constant.load_state_dict(state)  # --loss-scale: the flag's value stands
    assert constant.scale == 128.0


class RecordingOptimizer(Optimizer):
    """The protocol's two calls, recorded: a scaled gradient norm, and the coefficient applied."""

    def __init__(self, norm: float):
        self.config = OptimizerConfig(lr=1.0, clip_grad=1.0)
        self.norm, self.applied, self.param_groups = norm, [], []

    def grad_norm(self) -> float:
        return self.norm

    def apply(self, coefficient: float) -> None:
        self.applied.append(coefficient)
        self.publish_dp_bytes = 7

    def master_bytes(self) -> int:
        return 11


def test_the_wrapper_unscales_clips_and_skips():
    scaler = LossScaler(LossScalerConfig(initial_scale=1024.0, hysteresis=1))
    inner = RecordingOptimizer(norm=512.0)  # true norm 0.5: no clipping, only the unscale
    optimizer = LossScaledOptimizer(inner, scaler)
    result = optimizer.step()
    assert (result.skipped, result.grad_norm, inner.applied) == (False, 0.5, [1 / 1024])
    inner.norm = 4096.0  # true norm 4: clipped to 1 in the same multiplication
    assert optimizer.step().grad_norm == 4.0 and inner.applied[-1] == pytest.approx(1 / (4 + 1e-6) / 1024)
    inner.norm = math.inf
    result = optimizer.step()
    assert result.skipped and len(inner.applied) == 2 and scaler.scale == 512.0
    assert optimizer.publish_dp_bytes == 0 and optimizer.master_bytes() == 11  # the inner optimizer's


@pytest.mark.slow
def test_fp16_trains_like_fp32(builtin_corpus_small, tmp_path, monkeypatch):
    common = SMALL + builtin_corpus_small.training_args() + ["--train-iters", "12"]
    fp32 = run(common, monkeypatch, tmp_path, "fp32")
    fp16 = run(common + ["--fp16", "--initial-loss-scale", "4096"], monkeypatch, tmp_path, "fp16")
    assert [r["skipped"] for r in fp16] == [0] * 12 and {r["loss_scale"] for r in fp16} == {4096.0}
    assert "loss_scale" not in fp32[0]
    for a, b in zip(fp32, fp16):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a["iteration"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2)  # the norm reported is unscaled
    assert fp16[-1]["loss"] < fp16[0]["loss"] - 0.5


@pytest.mark.slow
def test_an_overflow_skips_the_step_and_halves_the_scale(builtin_corpus_small, tmp_path, monkeypatch):
    records = run(SMALL + builtin_corpus_small.training_args() + [
        "--train-iters", "10", "--fp16", "--initial-loss-scale", str(2.0 ** 21), "--hysteresis", "1",
        "--lr", "1e-3", "--lr-decay-style", "constant", "--lr-warmup-iters", "4"], monkeypatch, tmp_path, "overflow")
    skipped = [r["skipped"] for r in records]
    first_applied = skipped.index(0)
    assert first_applied >= 1 and skipped == [1] * first_applied + [0] * (10 - first_applied), skipped
    # the scale each record shows is the next iteration's: halved once per skipped step
    assert [r["loss_scale"] for r in records[:first_applied + 1]] == [
        2.0 ** (21 - min(i + 1, first_applied)) for i in range(first_applied + 1)]
    assert all(r["grad_norm"] is None for r in records[:first_applied])  # inf, written as null
    # skipped steps leave the schedule where it was: the first applied update warms up from 0
    assert [r["lr"] for r in records[:first_applied + 3]] == pytest.approx(
        [0.0] * (first_applied + 1) + [0.25e-3, 0.5e-3])


@pytest.mark.slow
def test_resume_restores_the_loss_scaler_exactly(builtin_corpus_small, tmp_path, monkeypatch):
    # The scale doubles after every 3 clean steps: 1024 -> 2048 at 3 -> 4096 at 6. A resume at 4
    # that lost the step counter would double at 7 instead.
    common = SMALL + builtin_corpus_small.training_args() + [
        "--train-iters", "8", "--fp16", "--initial-loss-scale", "1024", "--loss-scale-window", "3"]
    whole = run(common, monkeypatch, tmp_path, "whole")
    assert [r["loss_scale"] for r in whole] == [1024, 1024, 2048, 2048, 2048, 4096, 4096, 4096]
    save = ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt")]
    first = run(common + save + ["--exit-interval", "4"], monkeypatch, tmp_path, "parts")
    assert [r["iteration"] for r in first] == [1, 2, 3, 4]
    resumed = run(common + save, monkeypatch, tmp_path, "parts")
    assert [r["iteration"] for r in resumed] == list(range(1, 9))
    for a, b in zip(whole, resumed):
        assert (a["loss"], a["lr"], a["loss_scale"], a["grad_norm"]) == (b["loss"], b["lr"], b["loss_scale"],
                                                                         b["grad_norm"]), a["iteration"]
