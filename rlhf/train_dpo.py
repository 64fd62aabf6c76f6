#!/usr/bin/env python
"""DPO (direct preference optimisation) of an SFT model against a frozen reference, with FP8-LM.

    torchrun --nproc-per-node 2 rlhf/train_dpo.py --config configs/gpt-tiny.yaml \\
        $(python tools/builtin_rlhf.py --print-args --quiet) \\
        --pretrained-checkpoint runs/sft/checkpoints --train-iters 50 --lr 1e-5 --fp8-level O3 \\
        --dpo-beta 0.1 --reference-fp8-level O3 --eval-out runs/dpo/eval.json \\
        --save runs/dpo/checkpoints --load runs/dpo/checkpoints --metrics-file runs/dpo/metrics.jsonl

Flags are pretrain_gpt.py's plus the "DPO" group: `--data-path FILE.jsonl` is the training
preference pairs (records {"prompt", "chosen", "rejected"} or the chat layouts of `rlhf.data`),
`--valid-data-path` the validation pairs; the policy starts from `--pretrained-checkpoint` (or
resumes from `--load`), the frozen reference is `--reference-checkpoint` (default: the same) at
`--reference-fp8-level`; `--dpo-beta`, `--dpo-label-smoothing`; `--precompute-reference-logprobs`
computes the reference's log-probabilities of every pair once instead of at every step. Data
and tensor parallelism; no pipeline parallelism. Dropout is off unless `--keep-dropout`.

The metrics file has, per logged iteration, the DPO loss (`loss`) and `accuracy` (pairs whose
implicit reward is larger for the chosen answer, ties counting one half), `reward_margin`,
`chosen_reward`, `rejected_reward`, averaged over the global batch; evaluations add `val_loss`
(the DPO loss of --eval-iters validation batches). Validation accuracy: after training the
policy and the reference run once over every validation pair; the line "> validation: ..." gives
the DPO loss, the reward accuracy and margin, and how often the policy and the reference each
give the chosen answer the higher log-probability (the reference's figure is the starting
point); `--eval-out FILE` writes the same as JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.training.cli import run_cli  # noqa: E402
from megatron.training.config import parse_config  # noqa: E402
from megatron.training.training import setup_parallel  # noqa: E402
from rlhf.dpo import DPOArgs, DPORun, dpo_config, run_dpo  # noqa: E402
from tools.plot_metrics import plot_loss_if_asked  # noqa: E402


def run(argv: list[str] | None = None) -> DPORun:
    config = dpo_config(parse_config(argv, extra_sections={"dpo": DPOArgs}, description="DPO with FP8-LM"))
    config, ps = setup_parallel(config)
    result = run_dpo(config, ps)
    plot_loss_if_asked(config, ps)
    return result


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, defer_sigterm=True))  # a SIGTERM during start-up saves after the first iteration
