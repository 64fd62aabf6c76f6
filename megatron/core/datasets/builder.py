"""Train / valid / test datasets from a `GPTDatasetConfig`, blended where `--data-path` names several."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron.core.datasets.blended_dataset import BlendedDataset, samples_needed_per_dataset
from megatron.core.datasets.config import SPLIT_NAMES, GPTDatasetConfig
from megatron.core.datasets.gpt_dataset import GPTDataset, split_ranges
from megatron.core.datasets.indexed_dataset import IndexedDataset


def train_valid_test_num_samples(*, train_iters: int, global_batch_size: int, eval_interval: int,
                                 eval_iters: int) -> tuple[int, int, int]:
    """Megatron's sample counts: training, every evaluation (plus a final one), and one test pass."""
    if min(train_iters, global_batch_size, eval_interval) < 1 or eval_iters < 0:
        raise ValueError("--train-iters, --global-batch-size and --eval-interval must be >= 1, --eval-iters >= 0")
    evaluations = train_iters // eval_interval + 1
    return (train_iters * global_batch_size, evaluations * eval_iters * global_batch_size,
            eval_iters * global_batch_size)


def build_gpt_datasets(config: GPTDatasetConfig, num_samples: Sequence[int], *, eod_id: int | None = None,
                       vocab_size: int | None = None) -> list[torch.utils.data.Dataset | None]:
    """[train, valid, test]; None for a split with no share in `--split` or no samples requested.
    With `vocab_size` (the tokenizer's), data holding ids outside it is refused before any sample
    is built (`IndexedDataset.check_token_ids`: read from the index, or scanned once and cached)."""
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError("num_samples needs three non-negative counts: train, valid, test")
    indexed = [IndexedDataset(prefix) for prefix, _ in config.blend]
    if vocab_size is not None:
        for dataset in indexed:
            dataset.check_token_ids(vocab_size, config.data_cache_path)
    ranges = [split_ranges(len(dataset), config.split_weights) for dataset in indexed]
    datasets: list[torch.utils.data.Dataset | None] = []
    for split, (split_name, share, count) in enumerate(zip(SPLIT_NAMES, config.split_weights, num_samples)):
        if share == 0 or count == 0:
            datasets.append(None)
            continue
        split_documents = [dataset_ranges[split] for dataset_ranges in ranges]
        datasets.append(_build_split(config, indexed, split_documents, split_name, count, eod_id))
    return datasets


def _build_split(config: GPTDatasetConfig, indexed: list[IndexedDataset], document_ranges: list[tuple[int, int]],
                 split_name: str, num_samples: int, eod_id: int | None) -> torch.utils.data.Dataset:
    def component(dataset: IndexedDataset, document_range: tuple[int, int], count: int) -> GPTDataset:
        return GPTDataset(dataset, document_range=document_range, num_samples=count, seq_length=config.seq_length,
                          seed=config.seed, split_name=split_name, cache_dir=config.data_cache_path,
                          eod_id=eod_id, eod_mask_loss=config.eod_mask_loss)

    if len(indexed) == 1:
        return component(indexed[0], document_ranges[0], num_samples)
    weights = [weight for _, weight in config.blend]
    if weights[0] is None:  # prefixes alone: blend in proportion to the tokens of each split
        weights = [_tokens_in_range(dataset, rng) for dataset, rng in zip(indexed, document_ranges)]
        if any(w == 0 for w in weights):
            empty = indexed[weights.index(0)].path_prefix
            raise ValueError(f"the {split_name} split of {empty} has no tokens; drop it or change --split")
    needed = samples_needed_per_dataset(weights, num_samples)
    components = [component(dataset, rng, max(int(count), 1))
                  for dataset, rng, count in zip(indexed, document_ranges, needed)]
    return BlendedDataset(components, weights, num_samples)


def _tokens_in_range(dataset: IndexedDataset, document_range: tuple[int, int]) -> int:
    start, end = document_range
    return int(np.sum(dataset.sequence_lengths[start:end], dtype=np.int64))
