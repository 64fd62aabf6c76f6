#!/usr/bin/env python
"""PPO (InstructGPT / DeepSpeed-Chat): an actor (the SFT model) and a critic (from the reward
model) trained on the actor's rollouts, scored by a frozen reward model (or --reward-fn), with a
per-token KL penalty to the frozen reference.

    torchrun --nproc-per-node 2 rlhf/train_ppo.py --config configs/gpt-tiny.yaml \\
        --pretrained-checkpoint runs/sft-demo/checkpoints --reward-model runs/rm/checkpoints \\
        --data-path data/builtin-rlhf/prompts-train.jsonl \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/builtin/tokenizer.model \\
        --rollout-prompts 16 --group-size 1 --global-batch-size 16 --micro-batch-size 4 --ppo-epochs 2 \\
        --train-iters 40 --lr 1e-5 --fp8-level O3 --save runs/ppo/checkpoints --metrics-file runs/ppo/metrics.jsonl

Flags are pretrain_gpt.py's plus the "RLHF rollouts" and "PPO" groups (`--help`); see
rlhf/ppo.py for what an iteration does. The metrics record carries the reward, the KL to the
reference and its coefficient, the entropy, the clip fraction, the value loss and the frozen
models' weight bytes. The checkpoint holds actor and critic; tools/generate.py and
tools/sft_eval.py load its actor. Use dropout 0.
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
from rlhf.policy_gradient import RLArgs  # noqa: E402
from rlhf.ppo import PPOArgs, ppo_task  # noqa: E402
from tools.plot_metrics import plot_loss_if_asked  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, extra_sections={"rl": RLArgs, "ppo": PPOArgs}, description="PPO with FP8-LM")
    config, ps = setup_parallel(config)
    tokenizer_config = config.tokenizer.tokenizer_config()
    tokenizer = build_tokenizer(tokenizer_config)
    run_training(config, ps, ppo_task(config, ps, tokenizer, tokenizer_config), loss_name="rl loss")
    plot_loss_if_asked(config, ps)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, defer_sigterm=True))  # a SIGTERM during start-up saves after the first iteration
