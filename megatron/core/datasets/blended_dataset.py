"""Blending several datasets in fixed proportions (`--data-path 0.7 A 0.3 B`).

The order is deterministic and needs no seed: the k-th sample of dataset d is due at time
(k + 0.5) / w_d, and samples are served in order of due time (ties to the lower dataset index).
Every prefix of the blend then holds each dataset's share to within one sample, so even short runs
and single global batches see the requested mixture. Each component dataset shuffles itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index): which dataset serves blended sample i, and its sample number."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) == 0 or not np.isfinite(weights).all() or (weights <= 0).any() or size < 0:
        raise ValueError(f"blending needs at least one dataset, positive finite weights (got {weights.tolist()}) and "
                         "a non-negative size; fix the weights of --data-path")
    weights = weights / weights.sum()
    due_times, dataset_ids, sample_ids = [], [], []
    for dataset, weight in enumerate(weights):
        count = int(np.ceil(weight * size)) + 1  # more than this dataset can be due within `size`
        sample_numbers = np.arange(count, dtype=np.int64)
        due_times.append((sample_numbers + 0.5) / weight)
        dataset_ids.append(np.full(count, dataset, dtype=np.int16))
        sample_ids.append(sample_numbers)
    due_times, dataset_ids, sample_ids = map(np.concatenate, (due_times, dataset_ids, sample_ids))
    order = np.lexsort((dataset_ids, due_times))[:size]
    return dataset_ids[order], sample_ids[order]


def samples_needed_per_dataset(weights: Sequence[float], size: int) -> np.ndarray:
    """How many samples each component must provide for a blend of `size` samples."""
    dataset_index, _ = blending_indices(weights, size)
    return np.bincount(dataset_index, minlength=len(weights))


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights`."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights; give one weight per dataset")
        self.datasets = list(datasets)
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        self.size = size
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, size)
        needed = np.bincount(self.dataset_index, minlength=len(datasets))
        for dataset, count in zip(self.datasets, needed):
            if len(dataset) < count:
                raise ValueError(f"a blended component has {len(dataset)} samples but the blend needs {count}; "
                                 "size each component with samples_needed_per_dataset()")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for {self.size} samples")
        dataset = self.datasets[int(self.dataset_index[index])]
        return dataset[int(self.dataset_sample_index[index])]
