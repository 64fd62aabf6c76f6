#!/usr/bin/env python
"""GRPO: a policy (the SFT model) learns from the rewards of its own samples, several per prompt,
with a KL penalty to the frozen reference; no critic.

    torchrun --nproc-per-node 2 rlhf/train_grpo.py --config configs/gpt-tiny.yaml \\
        --pretrained-checkpoint runs/sft-demo/checkpoints --data-path data/builtin-rlhf/prompts-train.jsonl \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/builtin/tokenizer.model \\
        --reward-fn rlhf.rewards:builtin_exact_match --rollout-prompts 8 --group-size 4 \\
        --global-batch-size 16 --micro-batch-size 4 --train-iters 40 --lr 1e-5 --fp8-level O3 \\
        --hidden-dropout 0 --attention-dropout 0 --save runs/grpo/checkpoints --metrics-file runs/grpo/metrics.jsonl

Flags are pretrain_gpt.py's plus the "RLHF rollouts" group (`--help`). `--data-path` is a JSON-lines
file of prompts ({"prompt": "..."} or {"prompt": [messages]}, with any fields the reward function
reads). An iteration samples `--group-size` completions of each of `--rollout-prompts` prompts,
scores them and makes `--ppo-epochs` x (rollouts / global batch) updates; the metrics record
carries the mean reward, the KL to the reference, the entropy and the completion length. The
checkpoint is a GPT's: tools/generate.py and tools/sft_eval.py load it. Use dropout 0: the
updates' ratios are against the rollouts' log-probabilities.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.core.tokenizers.tokenizer import build_tokenizer  # noqa: E402
from megatron.training.cli import run_cli  # noqa: E402
from megatron.training.config import parse_config  # noqa: E402
from megatron.training.training import run_training, setup_parallel  # noqa: E402
from rlhf.policy_gradient import RLArgs, grpo_task  # noqa: E402
from tools.plot_metrics import plot_loss_if_asked  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, extra_sections={"rl": RLArgs}, description="GRPO with FP8-LM")
    config, ps = setup_parallel(config)
    tokenizer_config = config.tokenizer.tokenizer_config()
    tokenizer = build_tokenizer(tokenizer_config)
    task = grpo_task(config, ps, tokenizer, tokenizer_config)
    run_training(config, ps, task, loss_name="rl loss")
    plot_loss_if_asked(config, ps)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, defer_sigterm=True))  # a SIGTERM during start-up saves after the first iteration
