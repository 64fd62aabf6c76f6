"""Supervised fine-tuning as a task of the one training loop: the GPT of pretraining, SFT data
(`megatron.core.datasets.sft_dataset`: packed samples with segment ids and a response-only loss
mask) and its step; weights start from a pretrained checkpoint when there is nothing to resume."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from megatron.core.datasets.indexed_dataset import dataset_exists
from megatron.core.datasets.sft_dataset import LOSS_MASK_SUFFIX, VALID_SUFFIX, SFTDataset
from megatron.core.parallel_state import ParallelState
from megatron.core.pipeline_parallel.token_loss import token_denominator
from megatron.training.config import RunConfig
from megatron.training.flags import Section, flag
from megatron.training.gpt_providers import gpt_task, loss_func
from megatron.training.training import TrainingTask


@dataclass(frozen=True)
class SFTArgs(Section):
    title: ClassVar[str] = "supervised fine-tuning"
    pretrained_checkpoint: str | None = flag(
        None, "weights to start from when --load holds no checkpoint to resume (a pretraining run's --save "
              "folder, or one that tools/checkpoint/convert.py import wrote)")
    num_epochs: float | None = flag(None, "passes over the training samples (sets --train-iters)")
    sft_packing: bool = flag(True, "pack several samples into each sequence, attention confined to each "
                                   "(--no-sft-packing: one padded sample per sequence)", negatable=True)
    valid_data_path: str | None = flag(None, "SFT files of the validation samples (default: PREFIX-valid "
                                             "beside --data-path when tools/preprocess_sft.py wrote it)")

    def __post_init__(self) -> None:
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"--num-epochs must be > 0, got {self.num_epochs}")

    def fills_later(self) -> set[str]:
        return {"train_iters"} if self.num_epochs is not None else set()


def train_prefix(config: RunConfig) -> str:
    paths = config.data.data_path or []
    if len(paths) != 1:
        raise ValueError("SFT takes one --data-path PREFIX (what tools/preprocess_sft.py --output-prefix wrote)")
    return paths[0]


def valid_prefix(config: RunConfig) -> str | None:
    given = config.extra["sft"].valid_data_path
    if given:
        return given
    default = train_prefix(config) + VALID_SUFFIX
    return default if dataset_exists(default + LOSS_MASK_SUFFIX) else None


def with_epochs(config: RunConfig) -> RunConfig:
    """`config` with --train-iters from --num-epochs (whole global batches over that many passes
    of the packed training sequences); --train-iters as given otherwise."""
    sft = config.extra["sft"]
    if sft.num_epochs is None:
        if config.train_iters is None:
            raise ValueError("give --train-iters or --num-epochs")
        return config
    if config.training.train_iters is not None:
        raise ValueError("--num-epochs and --train-iters contradict each other; give one (a --config file "
                         "may set train-iters: pass --num-epochs with a config that does not)")
    dataset = SFTDataset(train_prefix(config), seq_length=config.data.seq_length, num_samples=1, seed=config.seed,
                         packing=sft.sft_packing)
    iters = max(1, math.floor(sft.num_epochs * dataset.sequences_per_epoch / config.global_batch_size))
    return replace(config, training=replace(config.training, train_iters=iters))


def sft_datasets_provider(config: RunConfig, num_samples, *, pad_id: int):
    sft = config.extra["sft"]
    common = dict(seq_length=config.data.seq_length, seed=config.seed, packing=sft.sft_packing, pad_id=pad_id)
    train = SFTDataset(train_prefix(config), num_samples=num_samples[0], split_name="train", **common)
    prefix = valid_prefix(config)
    valid = SFTDataset(prefix, num_samples=num_samples[1], split_name="valid", **common) \
        if prefix and num_samples[1] else None
    return train, valid, None


RESPONSE_TOKENS = "response tokens"


def sft_loss_func(loss_mask: torch.Tensor, denominator: torch.Tensor, output: torch.Tensor):
    """The loss over response tokens (`loss_func`), and how many there were (for the metrics record)."""
    loss, reported = loss_func(loss_mask, denominator, output)
    return loss, dict(reported, **{RESPONSE_TOKENS: loss_mask.sum().detach()})


def sft_forward_step(data_iterator, model, device: torch.device):
    """The GPT step on a packed batch: positions restart and attention stays within each sample;
    the loss is a mean over response tokens (by default those of the whole global batch:
    --calculate-per-token-loss)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["labels"], position_ids=batch["position_ids"],
                   segment_ids=batch["segment_ids"])
    return output, partial(sft_loss_func, batch["loss_mask"], token_denominator(batch, batch["loss_mask"]))


def sft_task(config: RunConfig, ps: ParallelState, vocab_size: int, pad_id: int) -> TrainingTask:
    """The GPT task of pretraining with SFT data and step, starting from --pretrained-checkpoint."""
    pretrained = config.extra["sft"].pretrained_checkpoint
    if pretrained and not Path(pretrained).is_dir():
        raise ValueError(f"--pretrained-checkpoint {pretrained} does not exist; pass a checkpoint folder")
    return replace(gpt_task(config, ps, vocab_size, eod_id=None, start_from=pretrained),
                   forward_step=partial(sft_forward_step, device=ps.device),
                   datasets_provider=partial(sft_datasets_provider, pad_id=pad_id),
                   loss_key="lm loss", initial_weights=pretrained, per_token_loss=True,
                   reported_counts={RESPONSE_TOKENS: "response_tokens"})
