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
from megatron.training.training import run_training, setup_parallel
from tools.plot_metrics import plot_loss_if_asked


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, extra_sections={"sft": SFTArgs}, description="Supervised fine-tuning with FP8-LM")
    config, ps = setup_parallel(config)
    config = with_epochs(config)
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
    task = sft_task(config, ps, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad)
    run_training(config, ps, task, loss_name="response loss", extra=f"; {config.train_iters} iterations")
    plot_loss_if_asked(config, ps)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, defer_sigterm=True))  # a SIGTERM during start-up saves after the first iteration
