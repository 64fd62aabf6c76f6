"""FP8 collectives over stock torch.distributed (gloo, NCCL): no forked NCCL, no FP8 arithmetic
inside the collective.

The FP8-LM gradient reduction (section 2.1), as DESIGN.md fixes it:

1. every rank holds per-tensor-scaled FP8 gradients; the ranks agree on the minimum scale of each
   tensor (one small all-reduce for all of them);
2. each rank re-quantizes its tensors to that shared scale times the auto-scaling factor mu;
3. the payloads travel as bytes: an all-to-all hands each rank one segment of every rank's
   payloads, which it sums in FP32 and casts back to FP8 (reduce-scatter); an all-gather of the
   FP8 segments completes an all-reduce;
4. the result's scale is N * mu * shared scale, so it dequantizes to the mean gradient, and the
   group's `ReductionStats` are returned for the auto-scaler: how many mu-scaled values
   saturated at the re-cast of step 2 and in the sums of step 3, and how many were flushed to
   zero (one small all-reduce of five counts).

Communication goes through a `Transport` so that this module needs nothing but torch; the
training framework passes one that counts bytes per process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

from fp8.formats import FormatSpec, get_spec
from fp8.tensor import ScalingTensor, cast_saturate


class Transport(Protocol):
    size: int
    rank: int  # this process's rank within the group

    def all_reduce_(self, t: torch.Tensor, op: str) -> torch.Tensor: ...      # "sum" / "min" / "max", in place
    # 1-D uint8 chunks, one per rank; received chunks have `output_numels` bytes (default: the sizes sent)
    def all_to_all(self, chunks: list[torch.Tensor], output_numels: list[int] | None = None) -> list[torch.Tensor]: ...
    def all_gather(self, t: torch.Tensor) -> torch.Tensor: ...                 # concatenated along dim 0


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class ProcessGroupTransport:
    """A Transport over a torch.distributed process group (None: the default group). A group of
    one skips its collectives unless `always_call` (to check that a backend runs them at all)."""

    def __init__(self, group=None, *, always_call: bool = False):
        self.group = group
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self._skip = self.size == 1 and not always_call

    def all_reduce_(self, t, op):
        if not self._skip:
            dist.all_reduce(t, op=_OPS[op], group=self.group)
        return t

    def all_to_all(self, chunks, output_numels=None):
        if self._skip:
            return list(chunks)
        sizes = output_numels if output_numels is not None else [c.numel() for c in chunks]
        received = chunks[0].new_empty(sum(sizes))
        dist.all_to_all_single(received, torch.cat(list(chunks)), sizes, [c.numel() for c in chunks],
                               group=self.group)
        return list(received.split(sizes))

    def all_gather(self, t):
        if self._skip:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts)


@dataclass
class ReductionStats:
    """What one FP8 gradient reduction did to the mu-scaled values, counted over the whole group.

    A value *saturates* when its magnitude before a cast is beyond the format's maximum, so the
    cast clips it: at the re-cast to mu x the shared scale before the sum (`presum_saturated`,
    out of `ranks` x `numel` values), or in the FP32 sum of the ranks' values (`sum_saturated`,
    out of `numel`; never at one rank). A value exactly at the maximum is not clipped: with
    current scaling every tensor's largest gradient sits there at mu = 1. `flushed` counts the
    non-zero values (of `nonzero`) that the re-cast turned into zeros; `nan` the non-finite sums."""

    numel: int = 0
    ranks: int = 1
    presum_saturated: int = 0
    sum_saturated: int = 0
    flushed: int = 0
    nonzero: int = 0
    nan: int = 0

    @property
    def overflow_frac(self) -> float:
        """The auto-scaler's statistic: the saturated fraction at the cast before the sum plus
        the saturated fraction of the sums (NaN when a value was not finite)."""
        if self.nan:
            return float("nan")
        total = max(self.numel, 1)
        return self.presum_saturated / (self.ranks * total) + self.sum_saturated / total

    @property
    def underflow_frac(self) -> float:
        return self.flushed / max(self.nonzero, 1)

    @property
    def nonfinite(self) -> bool:
        return self.nan > 0

    def __add__(self, other: ReductionStats) -> ReductionStats:
        assert self.numel == 0 or other.numel == 0 or self.ranks == other.ranks
        return ReductionStats(self.numel + other.numel, max(self.ranks, other.ranks),
                              *(getattr(self, f) + getattr(other, f) for f in _COUNT_FIELDS))


_COUNT_FIELDS = ("presum_saturated", "sum_saturated", "flushed", "nonzero", "nan")


@dataclass
class ReduceResult:
    tensors: list[ScalingTensor]
    stats: ReductionStats

    @property
    def overflow_frac(self) -> float:
        return self.stats.overflow_frac

    @property
    def nonfinite(self) -> bool:  # some input held inf or NaN: the step must be skipped
        return self.stats.nonfinite


def shared_scale_payloads(grads: Sequence[ScalingTensor], transport: Transport, mu: float, spec: FormatSpec):
    """Each gradient re-cast to mu x the group's minimum scale; returns (1-D byte payloads, scales,
    this rank's [saturated, flushed, non-zero] counts of that cast)."""
    scales = torch.stack([g.scale.reshape(()).float() for g in grads])
    shared = transport.all_reduce_(scales.clone(), "min")
    payloads, counts = [], torch.zeros(3, dtype=torch.float64, device=scales.device)
    for g, own, common in zip(grads, scales, shared):
        scaled = g.data.float() * (mu * common / own)
        payload = cast_saturate(scaled, spec, inf_to_nan=True)
        nonzero = scaled != 0
        counts += torch.stack([(scaled.abs() > spec.max).sum(), (nonzero & (payload.float() == 0)).sum(),
                               nonzero.sum()]).double()
        payloads.append(payload.reshape(-1).view(torch.uint8))
    return payloads, shared, counts


def fp32_sum(segments: list[torch.Tensor], spec: FormatSpec) -> torch.Tensor:
    """Every rank's FP8 bytes of one segment (all at one scale) summed in FP32, never in FP8."""
    return torch.stack([s.view(spec.dtype).float() for s in segments]).sum(0)


def _sum_received(segments: list[torch.Tensor], spec: FormatSpec, transport: Transport, presum_counts: torch.Tensor,
                  numel: int) -> tuple[torch.Tensor, ReductionStats]:
    """FP32 sum of every rank's FP8 bytes for one segment, its FP8 cast (sums beyond the maximum
    saturate) and the group's statistics, agreed with one small all-reduce."""
    summed = fp32_sum(segments, spec)
    sum_counts = torch.stack([(summed.abs() > spec.max).sum(), torch.isnan(summed).sum()]).double()
    counts = transport.all_reduce_(torch.cat([presum_counts, sum_counts]), "sum")
    saturated, flushed, nonzero, sum_saturated, nan = (int(c) for c in counts.tolist())
    stats = ReductionStats(numel, transport.size, saturated, sum_saturated, flushed, nonzero, nan)
    return cast_saturate(summed, spec, inf_to_nan=True), stats


@dataclass
class ReduceScatterResult:
    """This rank's contiguous segment of the mean of all ranks' gradients, flattened one after
    another: elements [start, end) of that flat sequence, in FP8 in units scaled per tensor by
    `scales` (element i of tensor t dequantizes as payload / scales[t])."""

    segment: torch.Tensor        # 1-D FP8 payload
    start: int
    end: int
    scales: torch.Tensor         # one per tensor: N * mu * the group's minimum scale
    stats: ReductionStats

    def dequantize(self, grads: Sequence[ScalingTensor]) -> torch.Tensor:
        """The segment as FP32 values (for checks and for owners that keep FP32 sums)."""
        per_element = torch.repeat_interleave(self.scales, torch.tensor([g.numel() for g in grads],
                                                                        device=self.scales.device))
        return self.segment.float() / per_element[self.start:self.end].to(self.segment.device)


def fp8_reduce_scatter(grads: Sequence[ScalingTensor], transport: Transport, *, mu: float = 1.0,
                       fmt: str = "e4m3") -> ReduceScatterResult:
    """Steps 1-3 of the module docstring up to the reduce-scatter: each rank ends with one of N
    equal segments (the last padded with zeros) of the flattened mean, in FP8."""
    spec = get_spec(fmt)
    assert all(g.tile is None for g in grads), "the FP8 gradient reduction takes per-tensor scales"
    n = transport.size
    payloads, shared, presum_counts = shared_scale_payloads(grads, transport, mu, spec)
    flat = torch.cat(payloads)
    numel = flat.numel()
    padded = -(-numel // n) * n
    flat = torch.cat([flat, flat.new_zeros(padded - numel)])  # zero bytes are +0.0 in both formats
    reduced, stats = _sum_received(transport.all_to_all(list(flat.chunk(n))), spec, transport, presum_counts, numel)
    size = padded // n
    rank = transport.rank
    start, end = min(rank * size, numel), min((rank + 1) * size, numel)
    return ReduceScatterResult(reduced[:end - start], start, end, (n * mu * shared).float(), stats)


@dataclass
class OwnerReduceResult:
    """The mean of every rank's gradients, each tensor whole on its owner: ``tensors[i]`` for the
    tensors this rank owns, None for the others."""

    tensors: list[ScalingTensor | None]
    stats: ReductionStats


def fp8_reduce_to_owners(grads: Sequence[ScalingTensor], owners: Sequence[int], transport: Transport, *,
                         mu: float = 1.0, fmt: str = "e4m3") -> OwnerReduceResult:
    """The reduce-scatter of FP8 ZeRO: as `fp8_reduce_scatter`, but the segments follow tensor
    ownership (`fp8.greedy_partition`) instead of an even split, so each tensor is summed whole
    by its owner. One uneven all-to-all: rank r receives, from every rank, the payloads of the
    tensors r owns."""
    spec = get_spec(fmt)
    assert len(owners) == len(grads) and all(g.tile is None for g in grads)
    n, rank = transport.size, transport.rank
    payloads, shared, presum_counts = shared_scale_payloads(grads, transport, mu, spec)
    chunks = [torch.cat([p for p, o in zip(payloads, owners) if o == r] or [payloads[0][:0]]) for r in range(n)]
    mine = [i for i, o in enumerate(owners) if o == rank]
    numel = sum(g.numel() for g in grads)
    received = transport.all_to_all(chunks, [chunks[rank].numel()] * n)
    reduced, stats = _sum_received(received, spec, transport, presum_counts, numel)
    tensors: list[ScalingTensor | None] = [None] * len(grads)
    for i, payload in zip(mine, reduced.split([grads[i].numel() for i in mine])):
        tensors[i] = ScalingTensor(payload.view(grads[i].shape), (n * mu * shared[i]).float(), spec)
    return OwnerReduceResult(tensors, stats)


def fp8_all_reduce(grads: Sequence[ScalingTensor], transport: Transport, *, mu: float = 1.0,
                   fmt: str = "e4m3") -> ReduceResult:
    """Mean of every rank's `grads` (per-tensor-scaled FP8, same shapes on every rank), in FP8:
    the reduce-scatter above, then an all-gather of the FP8 segments."""
    spec = get_spec(fmt)
    scattered = fp8_reduce_scatter(grads, transport, mu=mu, fmt=fmt)
    numel = sum(g.numel() for g in grads)
    segment = scattered.segment.view(torch.uint8)
    per_rank = -(-numel // transport.size)
    segment = torch.cat([segment, segment.new_zeros(per_rank - segment.numel())])
    full = transport.all_gather(segment)[:numel]
    tensors, offset = [], 0
    for g, scale in zip(grads, scattered.scales):
        payload = full[offset:offset + g.numel()].view(spec.dtype).view(g.shape)
        tensors.append(ScalingTensor(payload, scale, spec))
        offset += g.numel()
    return ReduceResult(tensors, scattered.stats)
