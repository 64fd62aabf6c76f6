"""FP8 ZeRO's tensor placement (FP8-LM, Algorithm 1): whole tensors, greedily balanced.

Splitting an FP8 tensor across ranks would split it across scales; FP8-LM instead gives each
tensor, whole and with its scale, to one rank: tensors sorted by size, largest first, each to
the rank with the fewest bytes assigned so far (ties to the lowest rank).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def greedy_partition(sizes: Sequence[int], num_ranks: int) -> list[int]:
    """The owner rank of each tensor, given the tensors' sizes (bytes or elements)."""
    if num_ranks < 1:
        raise ValueError(f"greedy_partition needs at least one rank, got {num_ranks}")
    if any(size < 0 for size in sizes):
        raise ValueError("tensor sizes must be non-negative")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))  # stable among equal sizes
    loads = [(0, rank) for rank in range(num_ranks)]  # (assigned, rank): the heap breaks ties by rank
    owners = [0] * len(sizes)
    for index in order:
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + sizes[index], rank))
    return owners


def rank_loads(sizes: Sequence[int], owners: Sequence[int], num_ranks: int) -> list[int]:
    """What each rank was assigned (the balance FP8-LM reports in its Table 8)."""
    loads = [0] * num_ranks
    for size, owner in zip(sizes, owners):
        loads[owner] += size
    return loads
