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
from fp8.scaling import default_chunk_numel
from fp8.tensor import ScalingTensor, cast_saturate, saturate_


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


class ReductionStats:
    """What one FP8 gradient reduction did to the mu-scaled values, counted over the whole group.

    A value *saturates* when its magnitude before a cast is beyond the format's maximum, so the
    cast clips it: at the re-cast to mu x the shared scale before the sum (`presum_saturated`,
    out of `ranks` x `numel` values), or in the FP32 sum of the ranks' values (`sum_saturated`,
    out of `numel`; never at one rank). A value exactly at the maximum is not clipped: with
    current scaling every tensor's largest gradient sits there at mu = 1. `flushed` counts the
    non-zero values (of `nonzero`) that the re-cast turned into zeros; `nan` the non-finite sums.

    The reductions leave the counts on the device (`counts`, in the order of `_DEVICE_ORDER`);
    statistics of several buckets add up there, and the first read of a count copies them to the
    host once: one device-to-host sync per step, not one per bucket. A reduction asked for
    ``group_stats=False`` leaves this rank's counts alone (`local`): they add up bucket by bucket
    and `summed` adds them over the group with one all-reduce for the whole step."""

    def __init__(self, numel: int = 0, ranks: int = 1, presum_saturated: int = 0, sum_saturated: int = 0,
                 flushed: int = 0, nonzero: int = 0, nan: int = 0, *, counts: torch.Tensor | None = None,
                 local: bool = False):
        self.numel, self.ranks, self._counts, self.local = numel, ranks, counts, local and counts is not None
        self._values = None if counts is not None else dict(
            presum_saturated=presum_saturated, sum_saturated=sum_saturated, flushed=flushed, nonzero=nonzero, nan=nan)

    def summed(self, transport: Transport) -> ReductionStats:
        """The group's statistics: this rank's local counts summed over `transport`'s group (one
        small all-reduce); statistics that are the group's already are returned as they are."""
        if not self.local:
            return self
        return ReductionStats(self.numel, self.ranks, counts=transport.all_reduce_(self._counts.clone(), "sum"))

    def read_with(self, values: Sequence[torch.Tensor] = ()) -> list[float]:
        """The counts (still on the device, and the group's) copied to the host together with
        `values` (0-dim tensors on the same device): one copy and one sync for all; returns
        `values` as numbers."""
        pending = self._values is None and not self.local
        read = torch.cat([v.reshape(1).double() for v in values]
                         + ([self._counts.double()] if pending else [])).tolist() if values or pending else []
        if pending:
            self._values = dict(zip(_DEVICE_ORDER, (int(c) for c in read[len(values):])))
        return read[:len(values)]

    def _read(self) -> dict[str, int]:
        assert not self.local, "one rank's counts: sum them over the group first (ReductionStats.summed)"
        if self._values is None:
            self._values = dict(zip(_DEVICE_ORDER, (int(c) for c in self._counts.tolist())))
        return self._values

    presum_saturated = property(lambda self: self._read()["presum_saturated"])
    sum_saturated = property(lambda self: self._read()["sum_saturated"])
    flushed = property(lambda self: self._read()["flushed"])
    nonzero = property(lambda self: self._read()["nonzero"])
    nan = property(lambda self: self._read()["nan"])

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

    def _is_empty(self) -> bool:  # what ReductionStats() is: the start of a sum
        return self.numel == 0 and self._counts is None and not any(self._values.values())

    def __add__(self, other: ReductionStats) -> ReductionStats:
        if self._is_empty() or other._is_empty():
            return other if self._is_empty() else self
        assert self.ranks == other.ranks and self.local == other.local, "local counts add to local counts only"
        if self._values is None and other._values is None:  # both still on the device: add there
            return ReductionStats(self.numel + other.numel, self.ranks, counts=self._counts + other._counts,
                                  local=self.local)
        mine, theirs = self._read(), other._read()
        return ReductionStats(self.numel + other.numel, self.ranks, **{f: mine[f] + theirs[f] for f in _COUNT_FIELDS})

    def astuple(self) -> tuple[int, ...]:
        """(numel, ranks, presum_saturated, sum_saturated, flushed, nonzero, nan)."""
        values = self._read()
        return (self.numel, self.ranks, *(values[f] for f in _COUNT_FIELDS))

    def __eq__(self, other) -> bool:
        return (isinstance(other, ReductionStats) and (self.numel, self.ranks) == (other.numel, other.ranks)
                and self._read() == other._read())

    def __repr__(self) -> str:
        counts = ", ".join(f"{f}={v}" for f, v in self._read().items())
        return f"ReductionStats(numel={self.numel}, ranks={self.ranks}, {counts})"


_COUNT_FIELDS = ("presum_saturated", "sum_saturated", "flushed", "nonzero", "nan")
# The order of the counts a reduction leaves on the device: its re-cast's, then its sums'.
_DEVICE_ORDER = ("presum_saturated", "flushed", "nonzero", "sum_saturated", "nan")


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
    scales = _own_scales(grads)
    shared = shared_scales(grads, transport, scales)
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
    """Every rank's FP8 bytes of one segment (all at one scale, equal lengths) summed in FP32, in
    rank order, never in FP8: one concatenation, one conversion and one sum, however many ranks."""
    return torch.cat(segments).view(spec.dtype).float().view(len(segments), -1).sum(0)


# ----- the gradient reduction in bounded chunks -------------------------------------------------
# Gradient values one rank re-casts and sends per round (1 byte each) are the configured chunk
# (`fp8.scaling.set_chunk_mb`): the reduction's FP32 working set is a few times that many bytes
# whatever the model's size, and a bucket smaller than it travels in one round.


class _Flat:
    """FP8 gradients read and written as one flat sequence of values (in their order)."""

    def __init__(self, grads: Sequence[ScalingTensor], spec: FormatSpec):
        self.grads, self.spec = list(grads), spec
        self.offsets = [0]
        for g in self.grads:
            assert g.data.is_contiguous(), "FP8 gradients must be contiguous"
            self.offsets.append(self.offsets[-1] + g.numel())
        self.numel = self.offsets[-1]

    def pieces(self, start: int, end: int):
        """(tensor index, local start, local end) covering the flat range [start, end)."""
        for i, g in enumerate(self.grads):
            lo, hi = max(start, self.offsets[i]), min(end, self.offsets[i + 1])
            if lo < hi:
                yield i, lo - self.offsets[i], hi - self.offsets[i]

    def recast(self, ranges: Sequence[tuple[int, int]], factors: Sequence[torch.Tensor],
               counts: torch.Tensor) -> torch.Tensor:
        """The values of the flat ranges [start, end), one range after another, times their
        tensor's factor, cast to FP8 (saturating), as bytes; past the end, zero bytes (+0.0).
        Adds [saturated, flushed, non-zero] to `counts`. One FP32 buffer holds all the ranges:
        two kernels per tensor piece (convert, then one multi-tensor multiply for all pieces) and
        a fixed number per call for the cast and the counts, however many tensors it spans."""
        spec, device = self.spec, counts.device
        ranges = _merged(ranges)
        values = torch.empty(sum(end - start for start, end in ranges), dtype=torch.float32, device=device)
        at, pieces, piece_factors = 0, [], []
        for start, end in ranges:
            for i, lo, hi in self.pieces(start, end):
                piece = values[at + self.offsets[i] + lo - start:at + self.offsets[i] + hi - start]
                piece.copy_(self.grads[i].data.reshape(-1)[lo:hi])
                pieces.append(piece)
                piece_factors.append(factors[i])
            covered = min(max(self.numel - start, 0), end - start)
            if covered < end - start:
                values[at + covered:at + end - start].zero_()
            at += end - start
        if pieces:
            torch._foreach_mul_(pieces, piece_factors)
        nonzero, saturated = values != 0, values.abs() > spec.max
        payload = saturate_(values, spec, inf_to_nan=True).to(spec.dtype)  # cast_saturate, in place
        flushed = nonzero & (payload.float() == 0)
        counts += torch.stack([saturated, flushed, nonzero]).sum(dim=1).double()
        return payload.view(torch.uint8)

    def count(self, start: int, end: int, factors: Sequence[torch.Tensor], counts: torch.Tensor) -> None:
        """What `recast` would add to `counts` (and NaNs as the sum would see them, in
        ``counts[3]``), with no payload: a group of one sends nothing."""
        spec = self.spec
        for i, lo, hi in self.pieces(start, end):
            scaled = self.grads[i].data.reshape(-1)[lo:hi].float() * factors[i]
            nonzero = scaled != 0
            flushed = nonzero & (cast_saturate(scaled, spec, inf_to_nan=True).float() == 0)
            counts += torch.stack([(scaled.abs() > spec.max).sum(), flushed.sum(), nonzero.sum(),
                                   (~torch.isfinite(scaled)).sum()]).double()

    def write(self, start: int, payload: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
        """FP8 bytes of the flat range starting at `start` into `outputs` (shaped like the grads)."""
        for i, lo, hi in self.pieces(start, min(start + payload.numel(), self.numel)):
            at = self.offsets[i] + lo - start
            outputs[i].view(-1)[lo:hi].view(torch.uint8).copy_(payload[at:at + hi - lo])


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` with each range that starts where the one before it ends joined to it."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _own_scales(grads: Sequence[ScalingTensor]) -> torch.Tensor:
    return torch.stack([g.scale.reshape(()).float() for g in grads])


def shared_scales(grads: Sequence[ScalingTensor], transport: Transport, own: torch.Tensor | None = None) -> torch.Tensor:
    """Step 1: the group's minimum scale of each tensor (one small all-reduce for all of them),
    from this rank's (`own`, when already stacked). A caller that reduces its gradients in
    several calls may take it once for all and pass each call its tensors' part (``shared=``)."""
    return transport.all_reduce_(_own_scales(grads) if own is None else own.clone(), "min")


def _begin(grads: Sequence[ScalingTensor], transport: Transport, mu: float, shared: torch.Tensor | None = None):
    """Step 1 (unless `shared` gives its result) and this rank's re-cast factor to mu x the
    shared scale of each tensor; with zeroed counters for the re-cast ([saturated, flushed,
    non-zero]) and the sums ([saturated, NaN])."""
    scales = _own_scales(grads)
    shared = shared_scales(grads, transport, scales) if shared is None else shared
    factors = [mu * common / own for own, common in zip(scales, shared)]
    presum = torch.zeros(3, dtype=torch.float64, device=shared.device)
    return shared, factors, presum, torch.zeros(2, dtype=torch.float64, device=shared.device)


def _sum_rounds(received: list[torch.Tensor], spec: FormatSpec, sum_counts: torch.Tensor) -> torch.Tensor:
    """FP32 sum of every rank's FP8 bytes for one round's values, cast back to FP8 bytes (sums
    beyond the maximum saturate); adds [saturated sums, NaN sums] to `sum_counts`."""
    summed = fp32_sum(received, spec)
    sum_counts += torch.stack([(summed.abs() > spec.max).sum(), torch.isnan(summed).sum()]).double()
    return cast_saturate(summed, spec, inf_to_nan=True).view(torch.uint8)


def _group_stats(transport: Transport, presum: torch.Tensor, sums: torch.Tensor, numel: int,
                 summed: bool = True) -> ReductionStats:
    """The group's statistics from this rank's counts (one small all-reduce), or with `summed`
    false this rank's own, to be summed later (`ReductionStats.summed`)."""
    local = ReductionStats(numel, transport.size, counts=torch.cat([presum, sums]), local=True)
    return local.summed(transport) if summed else local  # read when first asked


def _alone(flat: _Flat, mu: float, chunk_numel: int) -> ReductionStats:
    """A group of one: the mean is the gradient itself, left as it is; the statistics of the
    re-cast to mu are still counted (the auto-scaler needs them at every size)."""
    counts = torch.zeros(4, dtype=torch.float64, device=flat.grads[0].data.device if flat.grads else None)
    scales = [g.scale.reshape(()).float() for g in flat.grads]
    factors = [mu * own / own for own in scales]  # the re-cast factor with the group's scale = own
    for start in range(0, flat.numel, chunk_numel):
        flat.count(start, min(start + chunk_numel, flat.numel), factors, counts)
    # [saturated, flushed, non-zero, NaN] -> the device order, with no saturated sums.
    return ReductionStats(flat.numel, 1, counts=torch.cat([counts[:3], counts.new_zeros(1), counts[3:]]))


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


def _scatter_rounds(flat: _Flat, transport: Transport, factors, spec: FormatSpec, chunk_numel: int,
                    presum: torch.Tensor, sums: torch.Tensor):
    """The reduce-scatter in rounds: rank r's segment of the flat sequence is [r S, (r+1) S)
    (the last padded with zeros); each round every rank sends every rank one piece of that rank's
    segment, so the FP32 working set is a round's, not a segment's. Yields (offset in the
    segment, this rank's summed FP8 bytes there)."""
    n = transport.size
    size = -(-flat.numel // n)
    piece = max(1, -(-chunk_numel // n))
    for offset in range(0, size, piece):
        length = min(piece, size - offset)
        payload = flat.recast([(r * size + offset, r * size + offset + length) for r in range(n)], factors, presum)
        yield offset, _sum_rounds(transport.all_to_all(list(payload.split(length))), spec, sums)


def fp8_reduce_scatter(grads: Sequence[ScalingTensor], transport: Transport, *, mu: float = 1.0,
                       fmt: str = "e4m3", chunk_numel: int | None = None) -> ReduceScatterResult:
    """Steps 1-3 of the module docstring up to the reduce-scatter: each rank ends with one of N
    equal segments (the last padded with zeros) of the flattened mean, in FP8. Works in rounds
    of `chunk_numel` values per rank."""
    spec = get_spec(fmt)
    chunk_numel = default_chunk_numel(chunk_numel)
    assert all(g.tile is None for g in grads), "the FP8 gradient reduction takes per-tensor scales"
    n, rank = transport.size, transport.rank
    flat = _Flat(grads, spec)
    shared, factors, presum, sums = _begin(grads, transport, mu)
    size = -(-flat.numel // n)
    segment = torch.empty(size, dtype=torch.uint8, device=shared.device)
    for offset, reduced in _scatter_rounds(flat, transport, factors, spec, chunk_numel, presum, sums):
        segment[offset:offset + reduced.numel()] = reduced
    stats = _group_stats(transport, presum, sums, flat.numel)
    start, end = min(rank * size, flat.numel), min((rank + 1) * size, flat.numel)
    return ReduceScatterResult(segment[:end - start].view(spec.dtype), start, end, (n * mu * shared).float(), stats)


def round_parts(numel: int, ranks: int, chunk_numel: int) -> list[tuple[int, int]]:
    """(start, L) of each round of `_rounds` over `numel` values in a group of `ranks`: rounds of
    about `chunk_numel` values, each rank's part L values (the last round's padded with zeros)."""
    step = ranks * max(1, -(-chunk_numel // ranks))
    return [(start, -(-min(step, numel - start) // ranks)) for start in range(0, numel, step)]


def _rounds(flat: _Flat, transport: Transport, factors, spec: FormatSpec, chunk_numel: int,
            presum: torch.Tensor, sums: torch.Tensor):
    """The reduce-scatter of an all-reduce, round after round over consecutive flat ranges: a
    round covers [start, start + N L) (past the end, zeros), about `chunk_numel` values, and rank
    r sums its part [start + r L, start + (r + 1) L) of every rank's re-cast values. Each round
    re-casts one contiguous range, so its kernels do not grow with the group. Yields (start, L,
    this rank's summed FP8 bytes of its part)."""
    n = transport.size
    for start, length in round_parts(flat.numel, n, chunk_numel):
        payload = flat.recast([(start, start + n * length)], factors, presum)
        yield start, length, _sum_rounds(transport.all_to_all(list(payload.split(length))), spec, sums)


@dataclass
class OwnerReduceResult:
    """The mean of every rank's gradients, each tensor whole on its owner: ``tensors[i]`` for the
    tensors this rank owns, None for the others."""

    tensors: list[ScalingTensor | None]
    stats: ReductionStats


def owner_rounds(numels: Sequence[int], owners: Sequence[int], ranks: int, chunk_numel: int):
    """How `fp8_reduce_to_owners` runs one call over tensors of `numels` owned by `owners`:
    ``("direct", piece)`` - each round every rank sends every owner the next `piece` values of the
    tensors it owns (one all-to-all per round); or ``("rounds", None)`` - the all-reduce's rounds
    (`round_parts`) then a hand-over of each summed value to its owner (two per round). Direct
    sends only what others own (the ring's (n-1)/n of the bytes); it is taken unless it needs more
    collectives. A direct round's FP8 bytes received (n x piece) are at most the chunk's bytes
    (4 x `chunk_numel`), and what one rank re-casts in a round at most the chunk's values."""
    streams = [sum(size for size, owner in zip(numels, owners) if owner == r) for r in range(ranks)]
    receivers = max(1, sum(1 for length in streams if length))
    piece = max(1, min(4 * chunk_numel // ranks, chunk_numel // receivers))
    if -(-max(streams, default=0) // piece) <= 2 * len(round_parts(sum(numels), ranks, chunk_numel)):
        return "direct", piece
    return "rounds", None


def fp8_reduce_to_owners(grads: Sequence[ScalingTensor], owners: Sequence[int], transport: Transport, *,
                         mu: float = 1.0, fmt: str = "e4m3", chunk_numel: int | None = None,
                         in_place: bool = False, shared: torch.Tensor | None = None,
                         group_stats: bool = True) -> OwnerReduceResult:
    """The reduction of FP8 ZeRO: every tensor's mean, whole, on the rank that owns it
    (`fp8.greedy_partition`), by the way `owner_rounds` picks; both give the same bytes (each
    value re-cast, summed over the ranks in FP32 in rank order and cast back on its own). With
    `in_place` the owned means are written into the owned gradients' own bytes (their scales are
    replaced); otherwise into new tensors. `shared` and `group_stats` as in `fp8_all_reduce`. In
    a group of one the gradients are returned as they are."""
    spec = get_spec(fmt)
    chunk_numel = default_chunk_numel(chunk_numel)
    assert len(owners) == len(grads) and all(g.tile is None for g in grads)
    n, rank = transport.size, transport.rank
    flat = _Flat(grads, spec)
    if n == 1:
        return OwnerReduceResult(list(grads), _alone(flat, mu, chunk_numel))
    shared, factors, presum, sums = _begin(grads, transport, mu, shared)
    outputs = {i: grads[i].data if in_place else torch.empty_like(grads[i].data)
               for i, owner in enumerate(owners) if owner == rank}
    how, piece = owner_rounds([g.numel() for g in grads], owners, n, chunk_numel)
    if how == "direct":
        _to_owners_direct(flat, owners, transport, factors, outputs, piece, chunk_numel, presum, sums)
    else:
        _to_owners_in_rounds(flat, owners, transport, factors, outputs, chunk_numel, presum, sums)
    stats = _group_stats(transport, presum, sums, flat.numel, group_stats)
    tensors: list[ScalingTensor | None] = [None] * len(grads)
    for i, out in outputs.items():
        tensors[i] = ScalingTensor(out, (n * mu * shared[i]).float(), spec)
    return OwnerReduceResult(tensors, stats)


def _to_owners_direct(flat: _Flat, owners, transport: Transport, factors, outputs, piece: int, chunk_numel: int,
                      presum: torch.Tensor, sums: torch.Tensor) -> None:
    """Rank r's stream is the tensors r owns, in order; each round every rank re-casts and sends
    every owner the next `piece` values of its stream (one uneven all-to-all), and the owner sums
    them in FP32 a chunk's share per rank at a time."""
    n, rank, spec = transport.size, transport.rank, flat.spec
    streams = [[i for i, o in enumerate(owners) if o == r] for r in range(n)]
    lengths = [sum(flat.grads[i].numel() for i in stream) for stream in streams]
    mine_flat = _Flat([flat.grads[i] for i in streams[rank]], spec)
    mine_out = [outputs[i] for i in streams[rank]]
    step = max(1, chunk_numel // n)  # values per rank summed at once: a chunk of FP32 for all ranks
    for offset in range(0, max(lengths, default=0), piece):
        sent = [min(piece, max(lengths[r] - offset, 0)) for r in range(n)]
        ranges = [span for r in range(n) for span in _stream_ranges(flat, streams[r], offset, sent[r])]
        chunks = list(flat.recast(ranges, factors, presum).split(sent))
        length = sent[rank]
        received = transport.all_to_all(chunks, [length] * n)
        for at in range(0, length, step):
            summed = _sum_rounds([part[at:at + step] for part in received], spec, sums)
            mine_flat.write(offset + at, summed, mine_out)


def _to_owners_in_rounds(flat: _Flat, owners, transport: Transport, factors, outputs, chunk_numel: int,
                         presum: torch.Tensor, sums: torch.Tensor) -> None:
    """The all-reduce's rounds (`_rounds`: each rank sums an even part of a flat range), then
    each summed value handed to its tensor's owner (one uneven all-to-all): two collectives per
    round whatever the group's size; each rank sends 1/n of the bytes more than direct."""
    n, rank = transport.size, transport.rank
    for start, length, reduced in _rounds(flat, transport, factors, flat.spec, chunk_numel, presum, sums):
        spans = [(start + r * length, min(start + (r + 1) * length, flat.numel)) for r in range(n)]
        to_owner: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for i, lo, hi in flat.pieces(*spans[rank]):
            at = flat.offsets[i] + lo - spans[rank][0]
            to_owner[owners[i]].append(reduced[at:at + hi - lo])
        chunks = [torch.cat(c) if len(c) > 1 else c[0] if c else reduced[:0] for c in to_owner]
        mine = [[(i, lo, hi) for i, lo, hi in flat.pieces(*span) if owners[i] == rank] for span in spans]
        received = transport.all_to_all(chunks, [sum(hi - lo for _, lo, hi in pieces) for pieces in mine])
        for pieces, data in zip(mine, received):
            at = 0
            for i, lo, hi in pieces:
                outputs[i].view(-1)[lo:hi].view(torch.uint8).copy_(data[at:at + hi - lo])
                at += hi - lo


def _stream_ranges(flat: _Flat, stream: list[int], offset: int, length: int) -> list[tuple[int, int]]:
    """The flat ranges holding bytes [offset, offset + length) of the stream of tensors `stream`."""
    ranges, position = [], 0
    for i in stream:
        size = flat.grads[i].numel()
        lo, hi = max(offset, position), min(offset + length, position + size)
        if lo < hi:
            start = flat.offsets[i] + lo - position
            ranges.append((start, start + hi - lo))
        position += size
    return ranges


def fp8_all_reduce(grads: Sequence[ScalingTensor], transport: Transport, *, mu: float = 1.0,
                   fmt: str = "e4m3", chunk_numel: int | None = None, in_place: bool = False,
                   shared: torch.Tensor | None = None, group_stats: bool = True) -> ReduceResult:
    """Mean of every rank's `grads` (per-tensor-scaled FP8, same shapes on every rank), in FP8:
    round by round (`_rounds`), a reduce-scatter then an all-gather of the FP8 sums. With
    `in_place` the means are written into the gradients' own bytes (each round's values after
    they were sent); otherwise into new tensors. `shared`: step 1's result for these tensors,
    taken once for several calls (`shared_scales`); without `group_stats` the statistics are this
    rank's, for the caller to sum once for all its calls (`ReductionStats.summed`). In a group
    of one the gradients are returned as they are (the statistics are still counted)."""
    spec = get_spec(fmt)
    chunk_numel = default_chunk_numel(chunk_numel)
    assert all(g.tile is None for g in grads), "the FP8 gradient reduction takes per-tensor scales"
    n = transport.size
    flat = _Flat(grads, spec)
    if n == 1:
        return ReduceResult(list(grads), _alone(flat, mu, chunk_numel))
    shared, factors, presum, sums = _begin(grads, transport, mu, shared)
    outputs = [g.data if in_place else torch.empty_like(g.data) for g in grads]
    for start, _, reduced in _rounds(flat, transport, factors, spec, chunk_numel, presum, sums):
        flat.write(start, transport.all_gather(reduced), outputs)  # every rank's part, in rank order
    stats = _group_stats(transport, presum, sums, flat.numel, group_stats)
    tensors = [ScalingTensor(out, (n * mu * common).float(), spec) for out, common in zip(outputs, shared)]
    return ReduceResult(tensors, stats)
