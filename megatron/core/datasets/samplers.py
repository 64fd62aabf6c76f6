"""Which samples each data-parallel rank reads, as in Megatron's MegatronPretrainingSampler.

Global batch g covers samples [consumed + g * G, consumed + (g + 1) * G) whatever the parallel
layout, so runs with different data-parallel sizes see the same global batches. Within it, micro
step j gives rank r the slice [j * m * D + r * m, j * m * D + (r + 1) * m) (m micro-batch size,
D data-parallel size): the ranks' slices are disjoint and together cover the batch. Restarting
with `consumed_samples` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class PretrainingSampler:
    """A batch sampler yielding this rank's micro-batches (lists of sample indices), in order."""

    def __init__(self, *, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 global_batch_size: int, data_parallel_rank: int = 0, data_parallel_size: int = 1) -> None:
        samples_per_micro_step = micro_batch_size * data_parallel_size
        if micro_batch_size < 1 or data_parallel_size < 1 or total_samples < 0:
            raise ValueError("micro-batch size and data-parallel size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} is outside 0..{data_parallel_size - 1}")
        if global_batch_size % samples_per_micro_step:
            raise ValueError(
                f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                f"{micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        if consumed_samples < 0 or consumed_samples % samples_per_micro_step:
            raise ValueError(f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                             f"{samples_per_micro_step} (micro-batch size x data-parallel size)")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.data_parallel_rank, self.data_parallel_size = data_parallel_rank, data_parallel_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank in one global batch (gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def _end(self) -> int:
        # Only whole global batches: an optimizer step on a partial one would weigh samples differently.
        whole_batches = max(self.total_samples - self.consumed_samples, 0) // self.global_batch_size
        return self.consumed_samples + whole_batches * self.global_batch_size

    def __len__(self) -> int:
        return (self._end() - self.consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.data_parallel_size
        rank_offset = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self._end(), step):
            yield list(range(start + rank_offset, start + rank_offset + self.micro_batch_size))


def build_pretraining_data_loader(dataset: torch.utils.data.Dataset, *, consumed_samples: int, micro_batch_size: int,
                                  global_batch_size: int, data_parallel_rank: int = 0, data_parallel_size: int = 1,
                                  num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's micro-batches, starting after `consumed_samples` samples."""
    sampler = PretrainingSampler(
        total_samples=len(dataset), consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size, data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size)
    # A private generator: otherwise every new iterator draws its worker seed from the global RNG,
    # and a resumed run (which creates its iterators at another point) would drop out differently.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))


def cyclic_iterator(iterable: Iterable) -> Iterator:
    """Iterate again and again, e.g. over a validation loader that evaluation keeps drawing from."""
    while True:
        yielded = False
        for item in iterable:
            yielded = True
            yield item
        if not yielded:
            raise ValueError("cannot cycle over an empty data loader; request more samples for it")
