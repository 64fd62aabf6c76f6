#!/usr/bin/env python
"""Pretrain a GPT with FP8-LM.

    torchrun --nproc-per-node 2 pretrain_gpt.py --config configs/gpt-tiny.yaml \
        --tensor-model-parallel-size 2 --sequence-parallel --fp8-level O0 \
        $(python tools/builtin_corpus.py --print-args) --metrics-file runs/tiny/metrics.jsonl

Flags are Megatron-LM's; see `--help` and README.md.
"""

from __future__ import annotations

import sys

from megatron.core.tokenizers.tokenizer import build_tokenizer, tokenizer_config_from_args
from megatron.training.arguments import padded_vocab_size, parse_args
from megatron.training.cli import run_cli
from megatron.training.gpt_providers import gpt_task
from megatron.training.training import Trainer, print_rank0, setup_parallel


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loss_plot and not args.metrics_file:
        raise ValueError("--loss-plot needs --metrics-file (the plot is drawn from it)")
    ps = setup_parallel(args)
    tokenizer = build_tokenizer(tokenizer_config_from_args(args))
    args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args)
    task = gpt_task(args, ps, eod_id=tokenizer.eod)
    trainer = Trainer(args, ps, task)
    print_rank0(ps, f"> {ps.describe()}; {task.num_params:,} parameters; fp8 level {args.fp8_level}")
    try:
        state = trainer.train()
    finally:
        trainer.close()
    final = f"final loss {state.losses[-1]:.4f}, " if state.losses else ""
    print_rank0(ps, f"> done: {state.iteration} iterations, {final}{state.skipped_iterations} skipped")
    if args.loss_plot and ps.rank == 0:
        from tools.plot_metrics import plot_metrics
        plot_metrics([args.metrics_file], args.loss_plot)
        print(f"> loss curve: {args.loss_plot}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
