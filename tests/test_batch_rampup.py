"""--rampup-batch-size and sample-based training (--train-samples, --lr-*-samples): the global
batch of every iteration against a hand-computed sequence, the micro-batches each iteration
runs, consumed samples, the learning rate counted in samples as Megatron-LM counts it, and a
resume in the middle of the ramp."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

import pretrain_gpt
from megatron.core.num_microbatches_calculator import BatchSchedule
from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.gpt_providers import gpt_task
from megatron.training.training import Trainer, setup_parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--hidden-size", "64",
         "--ffn-hidden-size", "256", "--seq-length", "32", "--max-position-embeddings", "32", "--log-interval", "1",
         "--eval-interval", "1000", "--eval-iters", "0", "--fp8-min-features", "32"]
# Ramp 4 -> 16 in steps of 4 over the first 24 samples: (16 - 4) / 4 = 3 steps, one per 8 samples.
# An iteration starting after c samples takes 4 + 4 * floor(c / 8) while c <= 24, then 16:
#   c = 0 -> 4, 4 -> 4, 8 -> 8, 16 -> 12, 28 -> 16, 44 -> 16, ...
# --train-samples 100: the ramp's 4 iterations (to 28 samples), then (100 - 28) // 16 = 4 more.
RAMP = ["--micro-batch-size", "4", "--global-batch-size", "16", "--rampup-batch-size", "4", "4", "24",
        "--train-samples", "100", "--lr", "1e-3", "--min-lr", "0", "--lr-decay-style", "linear",
        "--lr-warmup-samples", "16"]
BATCHES = [4, 4, 8, 12, 16, 16, 16, 16]
CONSUMED = [4, 8, 16, 28, 44, 60, 76, 92]


def lr_at(samples: int) -> float:
    """Warm-up over 16 samples, then linear decay to 0 at --train-samples (100)."""
    return 1e-3 * (samples / 16 if samples <= 16 else 1 - (samples - 16) / (100 - 16))


def test_batch_sizes_by_hand():
    schedule = BatchSchedule(16, (4, 4, 24))
    consumed, batches = 0, []
    for _ in range(8):
        batches.append(schedule.global_batch_at(consumed))
        consumed += batches[-1]
    assert batches == BATCHES
    assert schedule.iterations_for(100) == 8 and schedule.samples_for(8) == 92 == CONSUMED[-1]
    assert schedule.batch_sizes() == [4, 8, 12, 16]
    assert [schedule.num_microbatches(c, 2, 2) for c in (0, 8, 16, 28)] == [1, 2, 3, 4]
    assert BatchSchedule(16, (16, 4, 100)).global_batch_at(0) == 16 and not BatchSchedule(16, (16, 4, 100)).ramps
    assert BatchSchedule(16).iterations_for(100) == 6 and BatchSchedule(16).samples_for(6) == 96


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_batch_ramps_per_iteration_with_its_micro_batches_and_samples(builtin_corpus_small, tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    metrics = tmp_path / "metrics.jsonl"
    argv = SMALL + RAMP + builtin_corpus_small.training_args() + ["--metrics-file", str(metrics)]
    calls, per_iteration = [0], []

    def main() -> int:
        config, ps = setup_parallel(parse_config(argv))
        tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
        task = gpt_task(config, ps, vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod)

        def counted(data_iterator, model):
            calls[0] += 1
            return task.forward_step(data_iterator, model)

        trainer = Trainer(config, ps, replace(task, forward_step=counted))
        train_step = trainer.train_step

        def counting_step():
            before = calls[0]
            result = train_step()
            per_iteration.append(calls[0] - before)
            return result

        trainer.train_step = counting_step
        try:
            trainer.train()
        finally:
            trainer.close()
        return 0

    assert run_cli(main) == 0
    records = read(metrics)
    assert [r["iteration"] for r in records] == list(range(1, 9))  # 8 iterations from --train-samples
    assert [r["train_iters"] for r in records] == [8] * 8
    assert [r["global_batch_size"] for r in records] == BATCHES
    assert per_iteration == [b // 4 for b in BATCHES]  # micro-batches of 4 per iteration
    assert [r["consumed_samples"] for r in records] == CONSUMED
    # the schedule's position is the samples consumed before each update
    assert [r["lr"] for r in records] == pytest.approx([lr_at(c - b) for c, b in zip(CONSUMED, BATCHES)])
    assert records[-1]["tokens_per_s"] > 0


@pytest.mark.slow
def test_resume_in_the_middle_of_the_ramp_is_exact(builtin_corpus_small, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = SMALL + RAMP + builtin_corpus_small.training_args()

    def run(extra, name):
        path = tmp_path / f"{name}.jsonl"
        assert run_cli(lambda: pretrain_gpt.main(common + extra + ["--metrics-file", str(path)])) == 0
        return read(path)

    whole = run([], "whole")
    checkpoint = ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt")]
    first = run(checkpoint + ["--exit-interval", "3"], "parts")  # stops at 16 samples, mid-ramp
    assert [r["consumed_samples"] for r in first] == CONSUMED[:3]
    resumed = run(checkpoint, "parts")
    assert [r["iteration"] for r in resumed] == list(range(1, 9))
    keys = ("loss", "lr", "grad_norm", "global_batch_size", "consumed_samples")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
