"""FP8 ZeRO's partition (level O3): which data-parallel rank owns each FP8 weight, and the buckets
its collectives run over.

Tensors are never split (FP8-LM's Algorithm 1, `fp8.greedy_partition`): each FP8 weight, with its
scale, belongs whole to one rank, which alone keeps its FP16 master and Adam moments. Gradients
reach their owner through `fp8.collectives.fp8_reduce_to_owners`; after the optimizer step every
rank receives the re-quantized weights (payloads and scales together) through one collective per
run of buckets (`publication_groups`): a padded all-gather where the run's owners hold about equal
shares, broadcasts from the owners where one or two hold it all. Buckets follow backward order and hold
about `bucket_numel` weights (bytes, at one byte each); the partition is global, so the loads
balance over the whole model, not per bucket.
"""

from __future__ import annotations

import torch.nn as nn

from fp8.zero import greedy_partition

# What an owner keeps per FP8 weight element: FP16 master (2) + FP8 first moment (1) + FP16
# second moment (2), at the O3 defaults; each of the three has a 4-byte scale per tensor.
OWNER_BYTES_PER_ELEMENT = 5
OWNER_SCALE_BYTES = 12


def backward_buckets(sizes: list[int], bucket_numel: int) -> list[list[int]]:
    """Indices of tensors of `sizes` (model order) in runs of about `bucket_numel` values, in the
    reverse order backward produces their gradients; a run closes once it reaches the size."""
    buckets, current, size = [], [], 0
    for index in reversed(range(len(sizes))):
        current.append(index)
        size += sizes[index]
        if size >= bucket_numel:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


class FP8ZeroLayout:
    def __init__(self, params: list[nn.Parameter], dp_size: int, bucket_numel: int):
        self.params, self.dp_size = list(params), dp_size
        self.owners = greedy_partition([p.numel() for p in self.params], dp_size)
        self.buckets = backward_buckets([p.numel() for p in self.params], bucket_numel)
        # Per bucket, each rank's tensors in bucket order: what the collectives carry, fixed for the run.
        self.bucket_owned: list[list[list[nn.Parameter]]] = [
            [[self.params[i] for i in bucket if self.owners[i] == r] for r in range(dp_size)] for bucket in self.buckets]
        self._publication_groups: dict[int, list[list[list[nn.Parameter]]]] = {}

    def publication_groups(self, byte_budget: int) -> list[list[list[nn.Parameter]]]:
        """Per publication (one collective), each rank's weights in bucket order: runs of
        consecutive buckets. A run closes once its pieces are balanced - the largest at most
        1.25x an even share, so that an all-gather padded to it sends little padding - or before
        a bucket would take it past `byte_budget` (one byte per weight: the all-gather's receive
        buffer is about the run's size). A bucket held by one or two owners alone is broadcast
        (`comm.all_gather_uneven`), in a ring as fast as a balanced all-gather of it. Worked out
        once per budget: the optimizer asks every step."""
        if byte_budget not in self._publication_groups:
            self._publication_groups[byte_budget] = self._group_buckets(byte_budget)
        return self._publication_groups[byte_budget]

    def _group_buckets(self, byte_budget: int) -> list[list[list[nn.Parameter]]]:
        groups: list[list[list[nn.Parameter]]] = []
        current: list[list[nn.Parameter]] | None = None
        for by_rank in self.bucket_owned:
            size = sum(p.numel() for owned in by_rank for p in owned)
            if current is not None and sum(p.numel() for owned in current for p in owned) + size > byte_budget:
                groups.append(current)
                current = None
            current = [list(owned) for owned in by_rank] if current is None else [
                mine + list(owned) for mine, owned in zip(current, by_rank)]
            loads = [sum(p.numel() for p in owned) for owned in current]
            if max(loads) * self.dp_size <= 1.25 * sum(loads):
                groups.append(current)
                current = None
        return groups + ([current] if current is not None else [])

    def owned(self, dp_rank: int) -> list[nn.Parameter]:
        return [p for p, owner in zip(self.params, self.owners) if owner == dp_rank]

    def owner_state_bytes(self) -> list[int]:
        """Bytes of masters and moments (with scales) each rank is assigned."""
        loads = [0] * self.dp_size
        for param, owner in zip(self.params, self.owners):
            loads[owner] += OWNER_BYTES_PER_ELEMENT * param.numel() + OWNER_SCALE_BYTES
        return loads

    def describe(self) -> str:
        loads = self.owner_state_bytes()
        ideal = sum(loads) / self.dp_size
        ranks = f"{self.dp_size} data-parallel rank" + ("s" if self.dp_size > 1 else "")
        buckets = f"{len(self.buckets)} bucket" + ("s" if len(self.buckets) > 1 else "")
        return (f"FP8 ZeRO: {len(self.params)} FP8 weights over {ranks} in {buckets}; master + Adam bytes per rank min {min(loads):,} max {max(loads):,} "
                f"(ideal {ideal:,.0f}, max/min {max(loads) / max(min(loads), 1):.3f})")
