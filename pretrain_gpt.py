#!/usr/bin/env python
"""Pretrain a GPT with FP8-LM.

    torchrun --nproc-per-node 2 pretrain_gpt.py --config configs/gpt-tiny.yaml \
        --tensor-model-parallel-size 2 --sequence-parallel --fp8-level O0 \
        $(python tools/builtin_corpus.py --print-args) --metrics-file runs/tiny/metrics.jsonl

Flags are Megatron-LM's; see `--help` and README.md.
"""

from __future__ import annotations

import sys

from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.gpt_providers import gpt_task
from megatron.training.training import run_training, setup_parallel
from tools.plot_metrics import plot_loss_if_asked


def main(argv: list[str] | None = None) -> int:
    config, ps = setup_parallel(parse_config(argv, description="Pretrain a GPT with FP8-LM"))
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
    run_training(config, ps, gpt_task(config, ps, vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod))
    plot_loss_if_asked(config, ps)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, defer_sigterm=True))  # a SIGTERM during start-up saves after the first iteration
