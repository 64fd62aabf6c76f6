"""The one place every collective goes through, so the bytes each rank sends are counted per group.

Bytes follow the ring cost model of NCCL's tests (DESIGN.md, "Contracts"), with S the full
unsharded size in bytes and n the group size: all-reduce 2(n-1)/n*S; reduce-scatter, all-gather
and all-to-all (n-1)/n*S; broadcast S on every rank (a pipelined ring forwards it); send S on the
sender only. Nothing is counted (or sent) when n == 1; fractions round down. The model is what is
counted, not what a fallback really moves, so CPU and GPU runs report the same.

Groups are named ("tp", "dp", "pp", "embedding") and resolved through a `ParallelState`; the
"embedding" group (first + last pipeline stage) is counted under "pp". The bytes go to that
`ParallelState`'s `counter` (a `CommCounter` value, not a process-wide one): whoever holds the
value reads it, and two states never mix their counts.

Two transport rules hide backend differences:
- 1-byte floats (float8) travel as uint8: neither gloo nor NCCL knows their scalar types, and
  gathering or moving bytes does not care. Reductions of 1-byte floats are refused (see
  `fp8.collectives` for reductions of FP8 data, which never sum in FP8).
- CUDA tensors use the fused tensor collectives (NCCL); CPU tensors use what gloo has supported
  across torch 2.6+ (list all-gather, all-reduce, all_to_all_single, isend/irecv).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from megatron.core.parallel_state import BUCKETS, CommCounter, ParallelState  # noqa: F401 (re-exported)

_RING_FACTOR = {"all_reduce": (2, True), "reduce_scatter": (1, True), "all_gather": (1, True),
                "all_to_all": (1, True), "broadcast": (1, False), "send": (1, False)}

SUM, MAX, MIN = ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN


def ring_bytes(op: str, full_nbytes: int, group_size: int) -> int:
    """Bytes one rank sends for `op` on a full payload of `full_nbytes` in a group of `group_size`."""
    if op not in _RING_FACTOR:
        raise ValueError(f"unknown collective {op!r}; use one of {', '.join(_RING_FACTOR)}")
    factor, scales_with_group = _RING_FACTOR[op]
    if group_size <= 1:
        return 0
    if not scales_with_group:
        return factor * full_nbytes
    return factor * (group_size - 1) * full_nbytes // group_size


def _count(ps: ParallelState, group: str, op: str, full_nbytes: int, group_size: int) -> None:
    ps.counter.add(group, ring_bytes(op, full_nbytes, group_size))


# ----- helpers ---------------------------------------------------------------------------------
def _resolve(ps: ParallelState, group: str):
    size = ps.group_size(group)
    process_group = ps.group(group)
    assert size == 1 or process_group is not None, (group, size)
    return process_group, size


def _is_byte_float(dtype: torch.dtype) -> bool:
    return dtype.itemsize == 1 and dtype not in (torch.uint8, torch.int8, torch.bool)


def _to_wire(t: torch.Tensor) -> torch.Tensor:
    """A view that gloo and NCCL can carry; shares storage, so receiving into it fills `t`."""
    return t.view(torch.uint8) if _is_byte_float(t.dtype) else t


def _check_reducible(t: torch.Tensor, op_name: str) -> None:
    if _is_byte_float(t.dtype):
        raise ValueError(f"{op_name} cannot sum {t.dtype} in place; dequantize first or use "
                         f"fp8.collectives, which reduces FP8 through all_to_all and an FP32 sum")


def _positive_dim(t: torch.Tensor, dim: int) -> int:
    if t.dim() == 0:
        raise ValueError("cannot split or concatenate a 0-d tensor; reshape it to 1-d first")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim {dim} is out of range for a {t.dim()}-d tensor")
    return dim % t.dim()


def _use_fused(t: torch.Tensor) -> bool:
    """The fused tensor collectives for CUDA (NCCL); the list forms older gloo also has for CPU."""
    return t.is_cuda


def _gather_single(out: torch.Tensor, inp: torch.Tensor, process_group) -> None:
    # all_gather_single replaces all_gather_into_tensor in torch 2.12+; older torch lacks it.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=process_group)


def _reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, process_group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=process_group)


# ----- collectives -----------------------------------------------------------------------------
def all_reduce(t: torch.Tensor, ps: ParallelState, group: str, op=SUM) -> torch.Tensor:
    """Reduces `t` in place across `group` and returns it."""
    process_group, size = _resolve(ps, group)
    if size == 1:
        return t
    _check_reducible(t, "all_reduce")
    buffer = t if t.is_contiguous() else t.contiguous()
    dist.all_reduce(buffer, op=op, group=process_group)
    if buffer is not t:
        t.copy_(buffer)
    _count(ps, group, "all_reduce", t.nbytes, size)
    return t


def all_reduce_max(t: torch.Tensor, ps: ParallelState, group: str) -> torch.Tensor:
    return all_reduce(t, ps, group, op=MAX)


def all_reduce_scalar(value: float, ps: ParallelState, group: str, op=SUM) -> float:
    """A Python number reduced across `group` (float64, so integer counts stay exact)."""
    if ps.group_size(group) == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ps.device)
    return all_reduce(t, ps, group, op=op).item()


def all_gather(t: torch.Tensor, ps: ParallelState, group: str, dim: int = 0) -> torch.Tensor:
    """Each rank's `t` (equal shapes) concatenated along `dim` in group-rank order."""
    process_group, size = _resolve(ps, group)
    if size == 1:
        return t
    dim = _positive_dim(t, dim)
    local = _to_wire(t.contiguous())
    if _use_fused(local):
        stacked = local.new_empty((size * local.shape[0], *local.shape[1:]))
        _gather_single(stacked, local, process_group)
        parts = stacked.chunk(size)
        gathered = stacked if dim == 0 else torch.cat(parts, dim=dim)
    else:
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=process_group)
        gathered = torch.cat(parts, dim=dim)
    _count(ps, group, "all_gather", t.nbytes * size, size)
    return gathered.view(t.dtype)


def reduce_scatter(t: torch.Tensor, ps: ParallelState, group: str, dim: int = 0) -> torch.Tensor:
    """Sums `t` across `group` and returns this rank's chunk along `dim` (a new tensor).

    On CPU (gloo) this runs as an all_reduce of the whole tensor, of which each rank keeps its
    chunk: gloo's ring all-reduce sends 2(n-1)/n*S per rank, twice the (n-1)/n*S counted here."""
    process_group, size = _resolve(ps, group)
    if size == 1:
        return t
    _check_reducible(t, "reduce_scatter")
    dim = _positive_dim(t, dim)
    if t.shape[dim] % size != 0:
        raise ValueError(f"reduce_scatter over {group} needs dimension {dim} of shape {tuple(t.shape)} "
                         f"to be divisible by the group size {size}; pad it to a multiple of {size}")
    if _use_fused(t):
        full = t.movedim(dim, 0).contiguous()
        chunk = full.new_empty((full.shape[0] // size, *full.shape[1:]))
        _reduce_scatter_single(chunk, full, process_group)
        chunk = chunk.movedim(0, dim).contiguous()
    else:
        # Older gloo has no reduce-scatter; the counter still charges the ring model's bytes.
        summed = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, group=process_group)
        chunk = summed.chunk(size, dim)[ps.group_rank(group)].contiguous()
    _count(ps, group, "reduce_scatter", t.nbytes, size)
    return chunk


def all_to_all(tensors: Sequence[torch.Tensor], ps: ParallelState, group: str,
               output_shapes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
    """Sends ``tensors[i]`` to group rank i; returns what each group rank sent here, in rank order.

    Received tensors have this rank's dtype and, unless `output_shapes` says otherwise, the shape of
    the tensor sent to the same rank (the symmetric exchange of equal chunks). Counted as the bytes
    sent to the other ranks.
    """
    process_group, size = _resolve(ps, group)
    if len(tensors) != size:
        raise ValueError(f"all_to_all over {group} needs one tensor per rank ({size}), got {len(tensors)}")
    if size == 1:
        return list(tensors)
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise ValueError(f"all_to_all needs one dtype, got {sorted({str(t.dtype) for t in tensors})}; "
                         f"cast the tensors to a common dtype first")
    shapes = [tuple(s) for s in output_shapes] if output_shapes is not None else [t.shape for t in tensors]
    # Bytes, so any dtype (float8 included) travels and split sizes are plain byte counts.
    send_bytes = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])
    send_splits = [t.numel() * dtype.itemsize for t in tensors]
    recv_splits = [math.prod(shape) * dtype.itemsize for shape in shapes]
    recv_bytes = send_bytes.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv_bytes, send_bytes, recv_splits, send_splits, group=process_group)
    # Exactly what leaves this rank (its own split stays): (n-1)/n of the total for equal splits.
    ps.counter.add(group, send_bytes.numel() - send_splits[ps.group_rank(group)])
    return [part.view(dtype).view(shape) for part, shape in zip(recv_bytes.split(recv_splits), shapes)]


def _uneven_by_broadcast(numels: Sequence[int]) -> bool:
    """Whether `all_gather_uneven` broadcasts (S bytes per rank, S the pieces' total) rather than
    all-gathers pieces padded to the largest ((n-1) x the largest per rank)."""
    return sum(numels) < (len(numels) - 1) * max(numels)


def all_gather_uneven_bytes(numels: Sequence[int], itemsize: int = 1) -> int:
    """What `all_gather_uneven` of pieces of `numels` elements counts on each rank."""
    if len(numels) <= 1:
        return 0
    if _uneven_by_broadcast(numels):
        return sum(numels) * itemsize
    return ring_bytes("all_gather", max(numels) * itemsize * len(numels), len(numels))


def all_gather_uneven(t: torch.Tensor, numels: Sequence[int], ps: ParallelState, group: str) -> list[torch.Tensor]:
    """Each group rank's 1-D `t`, where rank r's holds ``numels[r]`` elements (all one dtype), in
    group-rank order, by whichever of two sends fewer bytes (`all_gather_uneven_bytes`): one
    all-gather of the pieces padded to the largest (NCCL's and gloo's all-gathers take equal
    pieces), for pieces of about one size; or, where a few ranks hold most of the bytes (FP8
    ZeRO's bucket of one or two whole tensors), a broadcast from each rank that has a piece.
    Neither copies a piece once per rank."""
    process_group, size = _resolve(ps, group)
    if size == 1:
        return [t]
    rank = ps.group_rank(group)
    assert t.dim() == 1 and t.numel() == numels[rank], (t.shape, numels)
    if _uneven_by_broadcast(numels):
        return [broadcast(t.contiguous() if r == rank else t.new_empty(n), ps, group, src_group_rank=r)
                if n else t.new_empty(0) for r, n in enumerate(numels)]
    width = max(numels)
    local = t.contiguous().view(torch.uint8)
    if t.numel() < width:
        local = torch.cat([local, local.new_zeros((width - t.numel()) * t.dtype.itemsize)])
    gathered = all_gather(local, ps, group)
    step = width * t.dtype.itemsize
    return [gathered[r * step:r * step + n * t.dtype.itemsize].view(t.dtype) for r, n in enumerate(numels)]


def broadcast(t: torch.Tensor, ps: ParallelState, group: str, src_group_rank: int = 0) -> torch.Tensor:
    """Copies group rank `src_group_rank`'s `t` into `t` on every rank of `group` (in place).

    Counted as S on every rank; gloo's broadcast is a binomial tree in which the root sends S to
    up to ceil(log2 n) ranks and the group sends (n-1)*S in all (at n = 2: S from the root only)."""
    process_group, size = _resolve(ps, group)
    if size == 1:
        return t
    buffer = t if t.is_contiguous() else t.contiguous()
    dist.broadcast(_to_wire(buffer), src=ps.ranks(group)[src_group_rank], group=process_group)
    if buffer is not t:
        t.copy_(buffer)
    _count(ps, group, "broadcast", t.nbytes, size)
    return t


def barrier(ps: ParallelState, group: str) -> None:
    process_group, size = _resolve(ps, group)
    if size > 1:
        dist.barrier(group=process_group)


# ----- pipeline point-to-point -----------------------------------------------------------------
def send(t: torch.Tensor, dst_global_rank: int, ps: ParallelState) -> None:
    """Blocking send to another stage of this rank's pipeline; counted as "pp"."""
    send_recv(ps, sends=[(t, dst_global_rank)])


def recv(t: torch.Tensor, src_global_rank: int, ps: ParallelState) -> torch.Tensor:
    """Blocking receive into `t` (contiguous, preallocated) from another pipeline stage."""
    send_recv(ps, recvs=[(t, src_global_rank)])
    return t


def send_recv(ps: ParallelState, sends: Sequence[tuple[torch.Tensor, int]] = (),
              recvs: Sequence[tuple[torch.Tensor, int]] = ()) -> None:
    """Posts all sends and receives together, then waits: neighbours that exchange at the same time
    (1F1B steady state) cannot deadlock on each other's blocking send."""
    peers = [peer for _, peer in (*sends, *recvs)]
    for peer in peers:
        assert peer in ps.pp_ranks and peer != ps.rank, (peer, ps.pp_ranks, ps.rank)
    for t, _ in recvs:
        if not t.is_contiguous():
            raise ValueError("recv needs a contiguous tensor to receive into; allocate it with torch.empty")
    ops = [(dist.isend, _to_wire(t.contiguous()), peer) for t, peer in sends]
    ops += [(dist.irecv, _to_wire(t), peer) for t, peer in recvs]
    if not ops:
        return
    if any(_use_fused(t) for _, t, _ in ops):
        # NCCL needs the whole exchange in one group call to avoid ordering deadlocks.
        works = dist.batch_isend_irecv([dist.P2POp(op, t, peer, ps.pp_group) for op, t, peer in ops])
    else:
        works = [op(t, peer, group=ps.pp_group) for op, t, peer in ops]
    for work in works:
        work.wait()
    for t, _ in sends:
        _count(ps, "pp", "send", t.nbytes, ps.pp_size)
