#!/usr/bin/env python
"""Train the reward model of RLHF on preference pairs: the GPT backbone with a scalar head
(`rlhf.models.ScalarHeadGPT`), Bradley-Terry loss on the rewards of the chosen and rejected answers.

    torchrun --nproc-per-node 2 rlhf/train_reward_model.py --config configs/gpt-tiny.yaml \\
        --pretrained-checkpoint runs/sft/checkpoints --data-path prefs-train.jsonl \\
        --valid-data-path prefs-valid.jsonl --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/builtin/tokenizer.model --train-iters 200 --lr 1e-5 --fp8-level O3 \\
        --save runs/rm/checkpoints --load runs/rm/checkpoints --metrics-file runs/rm/metrics.jsonl

Flags are pretrain_gpt.py's plus the "reward model" group. `--data-path` is one JSON-lines file of
preference records ({"prompt", "chosen", "rejected"}, or the chat layouts `rlhf.data` reads),
rendered with `--chat-template`; pairs with a side longer than --seq-length are dropped (and
counted). The weights start from `--pretrained-checkpoint` (an SFT or pretraining run's GPT: its
backbone, the LM head left out; or another reward model) unless `--load` holds a reward-model
checkpoint to resume. Chosen and rejected sides run in one forward pass; each side's reward is
the head's value at its last token (its end of turn).

What is reported:
- the metrics file (`--metrics-file`): the loss is the Bradley-Terry loss ("rm loss"), and every
  record carries `correct_pairs`, the pairs of its global batch whose chosen reward is the larger
  (training accuracy = correct_pairs / global_batch_size); with `--valid-data-path`, `val_loss`
  at every --eval-interval is the Bradley-Terry loss on --eval-iters validation batches;
- validation accuracy: after training (not after a stop by --exit-interval, SIGTERM or
  --exit-duration-in-mins: the resumed run measures), every rank takes part in one pass over all
  validation pairs (data-parallel ranks share them), and rank 0 prints
  "> validation: accuracy A over N pairs, mean margin M, loss L" and, with `--eval-out FILE`,
  writes those numbers and the iteration as one JSON object.
Pipeline parallelism is not supported (refused); tensor, sequence and data parallelism and every
--fp8-level are.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron.core import checkpointing  # noqa: E402
from megatron.core.distributed import comm  # noqa: E402
from megatron.core.parallel_state import ParallelState  # noqa: E402
from megatron.core.tokenizers.tokenizer import build_tokenizer  # noqa: E402
from megatron.training.cli import run_cli  # noqa: E402
from megatron.training.config import RunConfig, parse_config  # noqa: E402
from megatron.training.flags import Section, flag  # noqa: E402
from megatron.training.gpt_providers import gpt_task, gpt_transformer  # noqa: E402
from megatron.training.inference_model import open_checkpoint  # noqa: E402
from megatron.training.metrics import model_flops_per_token  # noqa: E402
from megatron.training.training import run_training, TrainingTask, print_rank0, setup_parallel  # noqa: E402
from rlhf.common import chat_template_for, check_same_tokenizer  # noqa: E402
from rlhf.data import PreferencePair, read_preference_pairs  # noqa: E402
from rlhf.losses import bradley_terry_loss  # noqa: E402
from rlhf.models import (  # noqa: E402
    is_reward_model_checkpoint, reward_model_provider, reward_model_signature, sequence_rewards,
)
from rlhf.preference_dataset import PreferenceDataset, both_sides  # noqa: E402
from tools.plot_metrics import plot_loss_if_asked  # noqa: E402

LOSS_KEY = "rm loss"
CORRECT = "correct pairs"


@dataclass(frozen=True)
class RewardModelArgs(Section):
    title: ClassVar[str] = "reward model"
    pretrained_checkpoint: str | None = flag(
        None, "the model to start from when --load holds nothing to resume: an SFT (or pretraining) run's --save "
              "folder (its LM head is left out) or a reward model's")
    valid_data_path: str | None = flag(None, "JSON-lines file of validation preference pairs")
    chat_template: str = flag("auto", "how records become tokens: auto (the tokenizer's own template, else "
                                      "default), default, or a .jinja file")
    eval_out: str | None = flag(None, "write the final validation accuracy here (JSON)")


def train_path(config: RunConfig) -> str:
    paths = config.data.data_path or []
    if len(paths) != 1:
        raise ValueError("the reward model takes one --data-path FILE.jsonl of preference pairs")
    return paths[0]


def check_run(config: RunConfig) -> None:
    """What this script refuses before any process group exists."""
    if config.parallel.pipeline_model_parallel_size > 1:
        raise ValueError("reward-model training does not support pipeline parallelism; use "
                         "--pipeline-model-parallel-size 1 (tensor parallelism splits a large model)")
    train_path(config)
    rm = config.extra["reward_model"]
    if rm.eval_out and not rm.valid_data_path:
        raise ValueError("--eval-out needs --valid-data-path (the pairs the accuracy is measured on)")
    if rm.pretrained_checkpoint and not Path(rm.pretrained_checkpoint).is_dir():
        raise ValueError(f"--pretrained-checkpoint {rm.pretrained_checkpoint} does not exist; pass a checkpoint folder")


def resumable(config: RunConfig) -> bool:
    """Whether --load holds a checkpoint, which must then be a reward model's."""
    load = config.checkpoint.load
    if not load or checkpointing.latest_iteration(load) is None:
        return False
    if not is_reward_model_checkpoint(open_checkpoint(load)):
        raise ValueError(f"--load {load} holds a GPT checkpoint, not a reward model's; start from it with "
                         f"--pretrained-checkpoint {load} and --load a folder of this run")
    return True


def read_pairs(config: RunConfig, ps: ParallelState, template) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The training and validation pairs; pairs longer than --seq-length are dropped and counted."""
    seq_length = config.data.seq_length
    out = []
    for what, path in (("training", train_path(config)), ("validation", config.extra["reward_model"].valid_data_path)):
        if not path:
            out.append([])
            continue
        pairs, dropped = read_preference_pairs(path, template, max_tokens=seq_length)
        note = f" ({dropped} dropped: a side longer than --seq-length {seq_length})" if dropped else ""
        print_rank0(ps, f"> {what} preference pairs: {len(pairs)} from {path}{note}")
        out.append(pairs)
    return out[0], out[1]


def reward_datasets_provider(config: RunConfig, num_samples, *, train_pairs, valid_pairs, pad_id: int):
    common = dict(seq_length=config.data.seq_length, seed=config.seed, pad_id=pad_id)
    train = PreferenceDataset(train_pairs, num_samples=num_samples[0], **common)
    valid = PreferenceDataset(valid_pairs, num_samples=num_samples[1], **common) \
        if valid_pairs and num_samples[1] else None
    return train, valid, None


def pair_outcome(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rewards [2b] (chosen sides first) -> loss, accuracy, mean margin and correct-pair count."""
    chosen, rejected = rewards.float().chunk(2)
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    return {"loss": loss, "accuracy": accuracy, "margin": (chosen - rejected).mean(),
            "correct": (chosen > rejected).sum()}


def reward_loss_func(last_index: torch.Tensor, values: torch.Tensor):
    out = pair_outcome(sequence_rewards(values, last_index))
    return out["loss"], {LOSS_KEY: out["loss"].detach(), "accuracy": out["accuracy"].detach(),
                         "margin": out["margin"].detach(), CORRECT: out["correct"].detach()}


def reward_forward_step(data_iterator, model, device: torch.device):
    """Both sides of the micro-batch's pairs in one forward pass: [2b, s], the chosen first."""
    batch = both_sides({k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()})
    return model(batch["tokens"]), partial(reward_loss_func, batch["last_index"])


def reward_model_task(config: RunConfig, ps: ParallelState, vocab_size: int, pad_id: int,
                      train_pairs: list, valid_pairs: list, init_from: str | None) -> TrainingTask:
    """GPT pretraining's task with the scalar-head model, preference data and the pairwise step."""
    transformer = gpt_transformer(config, ps, vocab_size, init_from)
    m, h = config.model, config.model.hidden_size
    lm_head = transformer.vocab_size * h if transformer.untie_embeddings_and_output_weights else 0
    flops = model_flops_per_token(m.num_layers, h, m.ffn_hidden_size or 4 * h, m.num_attention_heads,
                                  m.query_groups, config.data.seq_length, 1, m.swiglu)
    return replace(gpt_task(config, ps, vocab_size, eod_id=None, start_from=init_from),
                   model_provider=partial(reward_model_provider, transformer=transformer, init_from=init_from),
                   forward_step=partial(reward_forward_step, device=ps.device),
                   datasets_provider=partial(reward_datasets_provider, train_pairs=train_pairs,
                                             valid_pairs=valid_pairs, pad_id=pad_id),
                   tokens_per_sample=2 * config.data.seq_length, loss_key=LOSS_KEY, flops_per_token=flops,
                   num_params=transformer.num_parameters() - lm_head + h + 1,
                   model_signature=reward_model_signature(transformer), initial_weights=None,
                   reported_counts={CORRECT: "correct_pairs"},
                   reported_means={"accuracy": "accuracy", "margin": "margin"}, metrics_section="rlhf",
                   log_fields={"rlhf.accuracy": "accuracy", "rlhf.margin": "margin"})


@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, pairs: list[PreferencePair], ps: ParallelState, *,
                        seq_length: int, micro_batch_size: int, pad_id: int) -> dict:
    """Accuracy, mean margin and mean loss over all `pairs`, the same on every rank (data-parallel
    ranks take every dp_size-th pair; tensor-parallel ranks the same ones)."""
    data = PreferenceDataset(pairs, seq_length=seq_length, num_samples=len(pairs), seed=0, pad_id=pad_id,
                             shuffle=False)
    mine = list(range(ps.dp_rank, len(pairs), ps.dp_size))
    totals = torch.zeros(4, dtype=torch.float64, device=ps.device)  # correct, margin sum, loss sum, pairs
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), micro_batch_size):
        items = [data[i] for i in mine[start:start + micro_batch_size]]
        batch = both_sides({k: torch.stack([item[k] for item in items]).to(ps.device) for k in items[0]})
        chosen, rejected = sequence_rewards(model(batch["tokens"]).double(), batch["last_index"]).chunk(2)
        totals += torch.stack([(chosen > rejected).sum().double(), (chosen - rejected).sum(),
                               -F.logsigmoid(chosen - rejected).sum(), chosen.new_tensor(len(items))])
    model.train(was_training)
    comm.all_reduce(totals, ps, "dp")
    correct, margin, loss, count = totals.tolist()
    return {"accuracy": correct / count, "margin": margin / count, "loss": loss / count, "pairs": int(count)}


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, extra_sections={"reward_model": RewardModelArgs},
                          description="Reward-model training with FP8-LM")
    check_run(config)
    config, ps = setup_parallel(config)
    rm = config.extra["reward_model"]
    tokenizer_config = config.tokenizer.tokenizer_config()
    tokenizer = build_tokenizer(tokenizer_config)
    check_same_tokenizer(tokenizer_config, {"SFT model": rm.pretrained_checkpoint})
    template = chat_template_for(tokenizer_config, rm.chat_template)
    train_pairs, valid_pairs = read_pairs(config, ps, template)
    init_from = None if resumable(config) else rm.pretrained_checkpoint
    task = reward_model_task(config, ps, tokenizer.vocab_size, tokenizer.pad, train_pairs, valid_pairs, init_from)
    start = f"; from {init_from}" if init_from else ""
    trainer = run_training(config, ps, task, loss_name=LOSS_KEY, extra=f"; {config.train_iters} iterations{start}")
    state = trainer.state
    if valid_pairs and state.iteration >= config.train_iters:  # a run stopped early measures when resumed
        result = preference_accuracy(trainer.model, valid_pairs, ps, seq_length=config.data.seq_length,
                                     micro_batch_size=config.micro_batch_size, pad_id=tokenizer.pad)
        print_rank0(ps, f"> validation: accuracy {result['accuracy']:.4f} over {result['pairs']} pairs, "
                        f"mean margin {result['margin']:.4f}, loss {result['loss']:.4f}")
        if rm.eval_out and ps.rank == 0:
            Path(rm.eval_out).write_text(json.dumps(dict(result, iteration=state.iteration)) + "\n")
    plot_loss_if_asked(config, ps)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, defer_sigterm=True))  # a SIGTERM during start-up saves after the first iteration
