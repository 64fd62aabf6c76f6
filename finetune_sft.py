#!/usr/bin/env python
"""Supervised fine-tuning of a GPT with FP8-LM, on data from tools/preprocess_sft.py.

    torchrun --nproc-per-node 2 finetune_sft.py --config configs/gpt-tiny.yaml \\
        --pretrained-checkpoint runs/pretrain-demo/checkpoints --data-path data/sft/train \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/builtin/tokenizer.model \\
        --num-epochs 3 --lr 1e-4 --fp8-level O3 --save runs/sft/checkpoints --load runs/sft/checkpoints

Flags are pretrain_gpt.py's (Megatron-LM's names) plus the "supervised fine-tuning" group: where
the weights start (`--pretrained-checkpoint`, or `--load` with `--finetune`), epochs, packing and
the validation files. The loss is the mean over response tokens.
"""

from __future__ import annotations

import sys

from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.sft import SFTArgs, sft_task, with_epochs
from megatron.training.training import Trainer, print_rank0, setup_parallel


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, extra_sections={"sft": SFTArgs}, description="Supervised fine-tuning with FP8-LM")
    config, ps = setup_parallel(config)
    config = with_epochs(config)
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
    task = sft_task(config, ps, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad)
    trainer = Trainer(config, ps, task)
    print_rank0(ps, f"> {ps.describe()}; {task.num_params:,} parameters; fp8 level {config.precision.fp8_level}; "
                    f"{config.train_iters} iterations")
    try:
        state = trainer.train()
    finally:
        trainer.close()
    final = f"final response loss {state.losses[-1]:.4f}, " if state.losses else ""
    print_rank0(ps, f"> done: {state.iteration} iterations, {final}{state.skipped_iterations} skipped")
    if config.logging.loss_plot and ps.rank == 0:
        from tools.plot_metrics import plot_metrics
        plot_metrics([config.logging.metrics_file], config.logging.loss_plot)
        print(f"> loss curve: {config.logging.loss_plot}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
