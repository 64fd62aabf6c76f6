"""Data-parallel gradient handling: contiguous FP32 gradient buffers in buckets.

Every trainable parameter gets a main gradient, a view into one contiguous buffer (FP32 by
default, whatever the parameter's dtype), which consumers ask for with ``ddp.dense_grad(param)``.
A post-accumulate hook adds each backward's gradient into it and frees ``param.grad``, so BF16
models accumulate micro-batches in FP32 as Megatron does. `finish_grad_sync` then

1. sums the gradients of sequence-parallel parameters (norms, row-parallel biases) across the
   tensor-parallel group, since each rank saw only its share of the tokens, and
2. all-reduces the buffer bucket by bucket across the data-parallel group and divides by its
   size (the loss is a per-rank mean).

Buckets follow reverse parameter order (the order backward produces gradients) and hold about
`bucket_size_mb` each; they bound the size of a single collective.

The weights the precision plan gives FP8 gradients (the FP8 linear weights at level O1 and above)
are not in the buffer: their gradient arrives as an FP8 `ScalingTensor` in the plan's
`FP8GradStore` (``fp8_grads``), and the plan's `FP8GradReducer` (``fp8_reducer``,
`fp8_reducer.py`) averages them over the data-parallel group in FP8 - all-reduced at O1 / O2, to
their owners under FP8 ZeRO (O3). `fp8_stats` then holds what it measured (mu, the saturated and
underflowed fractions, its data-parallel bytes).

With ``use_distributed_optimizer=True`` (ZeRO-1, `DistributedOptimizer`), step 2 reduce-scatters
instead: every bucket is padded to a multiple of ``dp_size * SHARD_ALIGN_NUMEL`` and data-parallel
rank r receives the averaged gradient of chunk r of every bucket (`Bucket.shard`); the rest of the
buffer keeps this rank's unreduced gradient and must not be read. The whole buffer is still
allocated, as in Megatron: backward writes every gradient before the reduce-scatter - unless
``shard_dense_grads=True`` (ZeRO-2, which the trainer turns on at level O3 with DP > 1): then each
bucket's full buffer is allocated when backward first writes into it and freed after its
reduce-scatter, and only this rank's chunks stay between steps (the same sums, so the same bits;
`reduced_grad` gives a parameter's kept chunk). In this mode
a bucket never mixes parameter dtypes (the updated parameters are all-gathered per bucket in their
own dtype), and a parameter whose layout is ``tied_embedding`` (a tied embedding that also lives on
another pipeline stage) gets a bucket of its own, so both stages shard it identically and the embedding
all-reduce between them can run on the owned chunk after the reduce-scatter.

With ``overlap_grad_reduce=True`` (``--overlap-grad-reduce``) each bucket - dense, or a bucket of
FP8 gradients (`FP8GradReducer.buckets`) - is reduced as soon as backward has produced its last
gradient, by a communication thread (`comm_worker.CommWorker`, over a data-parallel group of its
own) while backward goes on; `finish_grad_sync` hands over what is left and waits. Call
`start_grad_sync(num_microbatches)` before a step's first micro-batch: a parameter's gradient is
final once it has arrived that many times (the post-accumulate hook for dense parameters, the
store's `on_accumulate` for FP8 ones), which holds for every schedule, interleaved pipelines
included. Buckets are handed over in one fixed order (the order backward fills them), the same on
every rank. The reductions are the same as without overlap - the same buckets, collectives and
sums - so the results are the same to the bit; the sequence-parallel sums over tp run per bucket
in both modes, in the main thread, just before the bucket's data-parallel reduction.

With ``overlap_param_gather=True`` (``--overlap-param-gather``, with the distributed optimizer) the
optimizers hand their weight all-gathers to the same thread (`gather_async`), and a forward
pre-hook on every module that holds parameters waits for its own weights' gathers only;
`wait_param_gather` waits for all (the next `finish_grad_sync`, checkpoints, rollouts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from megatron.core.distributed import comm
from megatron.core.distributed.comm_worker import CommWorker, Job, worker_state
from megatron.core.distributed.fp8_transport import CommTransport
from megatron.core.parallel_state import CommCounter, ParallelState
from megatron.core.tensor_parallel.layout import ParamLayouts, layouts_of
from fp8.collectives import ReductionStats

if TYPE_CHECKING:
    from megatron.core.precision import AppliedPrecision


# The default size of a bucket of gradient collectives, dense and FP8 ZeRO alike.
BUCKET_SIZE_MB = 40.0
# Each rank's chunk of a bucket is a multiple of this many elements, so chunks start on 512-byte
# (FP32) / 256-byte (BF16) boundaries, which NCCL's collectives run fastest on.
SHARD_ALIGN_NUMEL = 128


def bucket_sizes_mb(ddp_bucket_size: int | None) -> tuple[float, float]:
    """``--ddp-bucket-size`` (parameters per bucket, Megatron's flag; None: `BUCKET_SIZE_MB`) as the
    sizes in MB of a dense FP32 gradient bucket and of an FP8 one (FP8 ZeRO's, one byte each)."""
    if ddp_bucket_size is None:
        return BUCKET_SIZE_MB, BUCKET_SIZE_MB
    return ddp_bucket_size * 4 / 2**20, ddp_bucket_size / 2**20


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor | None  # the full gradients of `params` (and any padding); None while a sharded buffer has none
    offset: int = 0               # where `buffer` starts in the grad buffer's (unsharded) layout
    numel: int = 0                # elements of `buffer`, padding included
    owned: torch.Tensor | None = None  # sharded buffer: this rank's chunk, kept between steps

    def shard(self, dp_rank: int, dp_size: int) -> torch.Tensor:
        """The view of `buffer` that data-parallel rank `dp_rank` owns under the distributed
        optimizer (in a sharded buffer: this rank's kept chunk)."""
        assert self.numel % dp_size == 0, (self.numel, dp_size)
        if self.owned is not None:
            return self.owned
        chunk = self.numel // dp_size
        return self.buffer[dp_rank * chunk:(dp_rank + 1) * chunk]


def _group_into_buckets(params: list[nn.Parameter], bucket_numel: int, split_by_kind: bool,
                        alone: frozenset[int] = frozenset()) -> list[list]:
    """Consecutive runs of `params`, each closed once it reaches `bucket_numel`; with `split_by_kind`
    also before a change of dtype and around a parameter that needs its own bucket (ids in `alone`)."""
    groups, current, size = [], [], 0
    for param in params:
        if current and split_by_kind and (param.dtype != current[-1].dtype or id(param) in alone
                                          or id(current[-1]) in alone):
            groups.append(current)
            current, size = [], 0
        current.append(param)
        size += param.numel()
        if size >= bucket_numel:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


class GradBuffer:
    """The main gradients of `params` in buckets of `dtype`.

    `pad_to` > 1 pads every bucket's end to a multiple of it (and splits buckets by dtype and around
    the `alone` parameters, the tied embedding's pipeline copies): the layout the distributed
    optimizer shards. With ``shard_of=(dp_rank, dp_size)`` as well (ZeRO-2) `data` holds only this
    rank's chunk of every bucket; a bucket's full buffer exists from the first gradient written
    into it (`view`) until `release`, after its reduce-scatter."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, device, bucket_numel: int,
                 pad_to: int = 1, alone: Iterable[nn.Parameter] = (), shard_of: tuple[int, int] | None = None):
        self.dtype, self.bucket_numel, self.device = dtype, bucket_numel, torch.device(device)
        groups = _group_into_buckets(list(reversed(params)), bucket_numel, split_by_kind=pad_to > 1,
                                     alone=frozenset(id(p) for p in alone))
        sizes = [math.ceil(sum(p.numel() for p in group) / pad_to) * pad_to for group in groups]
        self.sharded = shard_of is not None
        if self.sharded:
            dp_rank, dp_size = shard_of
            assert pad_to % dp_size == 0, (pad_to, dp_size)
        self.data = torch.zeros(sum(sizes) // (dp_size if self.sharded else 1), dtype=dtype, device=device)
        self.buckets: list[Bucket] = []
        # Where each parameter's gradient lies in the unsharded layout: the distributed optimizer's map.
        self.param_ranges: dict[nn.Parameter, tuple[int, int]] = {}
        self._place: dict[int, tuple[Bucket, int]] = {}  # id(param) -> (its bucket, its offset there)
        start, kept = 0, 0
        for group, size in zip(groups, sizes):
            bucket = Bucket(group, None if self.sharded else self.data[start:start + size], start, size)
            if self.sharded:
                bucket.owned = self.data[kept:kept + size // dp_size]
                kept += size // dp_size
            offset = start
            for param in group:
                self.param_ranges[param] = (offset, offset + param.numel())
                self._place[id(param)] = (bucket, offset - start)
                offset += param.numel()
            self.buckets.append(bucket)
            start += size
        self._views: dict[int, torch.Tensor] = {}  # unsharded: id(param) -> its fixed view
        if not self.sharded:
            for param in params:
                self._views[id(param)] = self.view(param)

    def view(self, param: nn.Parameter) -> torch.Tensor:
        """`param`'s gradient in its bucket's full buffer (shaped like it); a sharded buffer
        allocates the bucket's (zeros) at its first use."""
        if id(param) in self._views:
            return self._views[id(param)]
        bucket, at = self._place[id(param)]
        return self.materialize(bucket)[at:at + param.numel()].view_as(param)

    def materialize(self, bucket: Bucket) -> torch.Tensor:
        if bucket.buffer is None:
            bucket.buffer = torch.zeros(bucket.numel, dtype=self.dtype, device=self.device)
        return bucket.buffer

    def release(self, bucket: Bucket) -> None:
        """A sharded buffer drops a bucket's full buffer (its chunk is in `owned`)."""
        if self.sharded and bucket.buffer is not None:
            if bucket.buffer.is_cuda:  # the communication thread's stream may still be reading it
                bucket.buffer.record_stream(torch.cuda.current_stream(bucket.buffer.device))
            bucket.buffer = None

    def zero_(self) -> None:
        self.data.zero_()
        for bucket in self.buckets:
            self.release(bucket)

    @property
    def nbytes(self) -> int:
        """Bytes held between steps (a sharded buffer: this rank's chunks only)."""
        return self.data.numel() * self.data.element_size()

    @property
    def full_numel(self) -> int:
        return sum(b.numel for b in self.buckets)


def _accumulate_into(grad_buffer: GradBuffer, arrived=None):
    def hook(param: torch.Tensor) -> None:
        grad_buffer.view(param).add_(param.grad)
        param.grad = None
        if arrived is not None:
            arrived(param)
    return hook


@dataclass
class _Unit:
    """One reduction handed to the communication thread as a whole: a dense bucket, or a bucket
    of FP8 gradients (indices into the FP8 reducer's parameters)."""

    params: list[nn.Parameter]
    dense: Bucket | None = None
    fp8: list[int] | None = None
    waiting: int = 0        # parameters whose final gradient has not arrived yet
    handed_over: bool = False


class DistributedDataParallel(nn.Module):
    """Wraps a model; `forward` is the model's. Call `zero_grad_buffer()` before a step's first
    micro-batch and `finish_grad_sync()` after its last backward.

    ``use_distributed_optimizer=True`` pads the buckets for sharding and makes `finish_grad_sync`
    reduce-scatter them; pair it with `megatron.core.optimizer.distrib_optimizer.DistributedOptimizer`."""

    def __init__(self, module: nn.Module, ps: ParallelState, *, grad_dtype: torch.dtype = torch.float32,
                 bucket_size_mb: float = BUCKET_SIZE_MB, use_distributed_optimizer: bool = False,
                 precision: AppliedPrecision | None = None, layouts: ParamLayouts | None = None,
                 overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
                 shard_dense_grads: bool = False):
        super().__init__()
        self.module, self.ps = module, ps
        self.use_distributed_optimizer = use_distributed_optimizer
        # The plan's reduction of FP8 weight gradients (O1+): their store, auto-scaler and owners.
        self.fp8_reducer = precision.reducer if precision is not None else None
        reducer = self.fp8_reducer
        self.fp8_grad_params = reducer.params if reducer is not None else []
        self.fp8_grads = reducer.store if reducer is not None else None
        self.fp8_autoscaler = reducer.autoscaler if reducer is not None else None
        self.fp8_zero = reducer.zero if reducer is not None else None
        params = self.dense_grad_params(module, self.fp8_grad_params)
        bucket_numel = max(1, int(bucket_size_mb * 2**20 / torch.tensor([], dtype=grad_dtype).element_size()))
        device = params[0].device if params else ps.device
        pad_to = ps.dp_size * SHARD_ALIGN_NUMEL if use_distributed_optimizer else 1
        self.layouts = layouts if layouts is not None else layouts_of(module)
        # ZeRO-2 (FP8 ZeRO, level O3): only this rank's chunks of the dense gradients stay between steps.
        self.shard_dense_grads = bool(shard_dense_grads) and use_distributed_optimizer and ps.dp_size > 1
        self.grad_buffer = GradBuffer(params, grad_dtype, device, bucket_numel, pad_to=pad_to,
                                      alone=self.layouts.params(tied_embedding=True),
                                      shard_of=(ps.dp_rank, ps.dp_size) if self.shard_dense_grads else None)
        # Overlap needs more than one data-parallel rank to have anything to overlap.
        self.overlap_grad_reduce = bool(overlap_grad_reduce) and ps.dp_size > 1
        arrived = self._arrived if self.overlap_grad_reduce else None
        hook = _accumulate_into(self.grad_buffer, arrived)
        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]
        self.sequence_parallel_params = [p for p in params if self.layouts[p].sequence_parallel]
        sp = {id(p) for p in self.sequence_parallel_params}
        self._bucket_sp = [[p for p in b.params if id(p) in sp] for b in self.grad_buffer.buckets]
        self._units: list[_Unit] = []
        self._armed = False
        self.overlap_param_gather = bool(overlap_param_gather) and ps.dp_size > 1
        if self.overlap_param_gather and not use_distributed_optimizer:
            raise ValueError("--overlap-param-gather overlaps the distributed optimizer's weight all-gathers; "
                             "add --use-distributed-optimizer (or train at --fp8-level O3 with DP > 1)")
        if self.overlap_grad_reduce or self.overlap_param_gather:
            self._worker_ps = worker_state(ps)
            self._worker = CommWorker(params[0].device if params else ps.device)
        if self.overlap_grad_reduce:
            self._setup_overlap(module, params)
        self._gathering: dict[int, Job] = {}  # id(param) -> the all-gather its new value waits for
        if self.overlap_param_gather:
            # The gathers count into a counter of their own; the step is charged when it hands them over.
            self._gather_ps = self._worker_ps.replace(counter=CommCounter())
            for sub in module.modules():
                if any(True for _ in sub.parameters(recurse=False)):
                    sub.register_forward_pre_hook(self._wait_for_own_params)

    @property
    def fp8_stats(self) -> dict[str, float]:
        """What the last FP8 gradient reduction measured: mu, the saturated and underflowed
        fractions, its bytes (empty without FP8 gradients). Its counts wait on the device until
        read: here (one host sync), or with the step's loss by `read_with_fp8_stats`."""
        if self.fp8_reducer is None:
            return {}
        self.fp8_reducer.settle()
        return dict(self.fp8_reducer.last)

    def read_with_fp8_stats(self, value: torch.Tensor) -> float:
        """`value` (a 0-dim device tensor: the step's loss) read to the host together with the FP8
        reduction's statistics: one sync for both, where reading each would be two."""
        if self.fp8_reducer is None:
            return value.item()
        return self.fp8_reducer.settle(value)[0]

    @staticmethod
    def dense_grad_params(module: nn.Module, fp8_grad_params=()) -> list[nn.Parameter]:
        """Trainable parameters whose gradients arrive as dense tensors (in definition order)."""
        fp8 = {id(p) for p in fp8_grad_params}
        return [p for p in module.parameters() if p.requires_grad and id(p) not in fp8]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def dense_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The accumulated (after `finish_grad_sync`, reduced) gradient of a dense parameter."""
        return self.grad_buffer.view(param)

    def reduced_grad(self, param: nn.Parameter) -> torch.Tensor:
        """After `finish_grad_sync`, what of `param`'s reduced gradient a collective may finish:
        `dense_grad`, or with sharded gradients this rank's chunk of its bucket (a tied embedding's
        pipeline copy has a bucket of its own, sharded alike on both stages)."""
        if not self.shard_dense_grads:
            return self.dense_grad(param)
        bucket, _ = self.grad_buffer._place[id(param)]
        return bucket.owned

    def zero_grad_buffer(self) -> None:
        self.grad_buffer.zero_()
        if self.fp8_grads is not None:
            self.fp8_grads.clear()

    @property
    def fp8_grad_bytes(self) -> int:
        return self.fp8_reducer.held_bytes if self.fp8_reducer is not None else 0

    @property
    def fp8_grad_peak_bytes(self) -> int:
        return self.fp8_reducer.peak_bytes if self.fp8_reducer is not None else 0

    def finish_grad_sync(self) -> None:
        """Sequence-parallel sums over tp, then the data-parallel mean: all-reduced into the whole
        buffer, or (distributed optimizer) reduce-scattered into this rank's chunk of each bucket.
        With overlap (after `start_grad_sync`): hands over the buckets still waiting and waits."""
        self.wait_param_gather()  # a weight no forward used is gathered by now, before the step updates it
        if self._armed:
            self._finish_overlapped()
            return
        for index in range(len(self.grad_buffer.buckets)):
            self._sequence_parallel_sum(index)
        if self.fp8_reducer is not None:
            self.fp8_reducer.reduce()
        if self.ps.dp_size == 1:
            return
        for bucket in self.grad_buffer.buckets:
            self._reduce_dense(bucket, self.ps)

    def _sequence_parallel_sum(self, index: int) -> None:
        """The tp sum of the sequence-parallel parameters' gradients in dense bucket `index`: each
        rank saw only its share of the tokens. One collective per bucket: they are many and small."""
        if self.ps.tp_size == 1 or not self._bucket_sp[index]:
            return
        grads = [self.dense_grad(p) for p in self._bucket_sp[index]]
        flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), self.ps, "tp")
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(summed.view_as(grad))

    def _reduce_dense(self, bucket: Bucket, ps: ParallelState) -> None:
        if self.use_distributed_optimizer:
            owned = bucket.shard(ps.dp_rank, ps.dp_size)
            owned.copy_(comm.reduce_scatter(self.grad_buffer.materialize(bucket), ps, "dp"))
            owned.div_(ps.dp_size)
            self.grad_buffer.release(bucket)
        else:
            comm.all_reduce(bucket.buffer, ps, "dp")
            bucket.buffer.div_(ps.dp_size)

    # ----- overlapped reduction ------------------------------------------------------------------
    def _setup_overlap(self, module: nn.Module, params: list[nn.Parameter]) -> None:
        """The units (dense buckets and FP8 buckets) in the order backward completes them: by
        their earliest parameter in the model, latest first."""
        position = {id(p): i for i, p in enumerate(module.parameters())}
        units = [_Unit(list(b.params), dense=b) for b in self.grad_buffer.buckets]
        if self.fp8_reducer is not None:
            for indices in self.fp8_reducer.buckets(self.grad_buffer.bucket_numel):
                units.append(_Unit(self.fp8_reducer.bucket_params(indices), fp8=indices))
            self.fp8_grads.on_accumulate = self._arrived
        units = [u for u in units if u.params]
        units.sort(key=lambda u: -min(position[id(p)] for p in u.params))
        self._units = units
        self._unit_of = {id(p): u for u in units for p in u.params}
        self._dense_index = {id(b): i for i, b in enumerate(self.grad_buffer.buckets)}

    def start_grad_sync(self, num_microbatches: int) -> None:
        """Arm the overlap for a step of `num_microbatches` backward passes (no-op without it)."""
        if not self.overlap_grad_reduce:
            return
        self._expected = int(num_microbatches)
        self._arrivals: dict[int, int] = {}
        for unit in self._units:
            unit.waiting, unit.handed_over = len(unit.params), False
        self._next = 0
        self._mu = self.fp8_reducer.mu if self.fp8_reducer is not None else 1.0
        self._fp8_result = ReductionStats()
        self._fp8_dp_bytes = 0
        self._armed = True

    def _arrived(self, param: nn.Parameter) -> None:
        """A gradient of `param` has been accumulated; on its last micro-batch its unit is one
        parameter closer to ready, and ready units are handed over in order."""
        if not self._armed:
            return
        count = self._arrivals.get(id(param), 0) + 1
        self._arrivals[id(param)] = count
        if count < self._expected:
            return
        unit = self._unit_of[id(param)]
        if count > self._expected or unit.handed_over:
            raise RuntimeError(
                f"--overlap-grad-reduce: a parameter of shape {tuple(param.shape)} received gradient {count} of a "
                f"step of {self._expected} micro-batches after its bucket's reduction had started; overlap needs every "
                f"parameter to receive one gradient per micro-batch - run without --overlap-grad-reduce")
        unit.waiting -= 1
        self._hand_over_ready()

    def _hand_over_ready(self, everything: bool = False) -> None:
        while self._next < len(self._units) and (everything or self._units[self._next].waiting == 0):
            unit = self._units[self._next]
            unit.handed_over = True
            self._next += 1
            if unit.dense is not None:
                self._sequence_parallel_sum(self._dense_index[id(unit.dense)])
                self._worker.submit(lambda b=unit.dense: self._reduce_dense(b, self._worker_ps))
            else:
                self._worker.submit(lambda i=unit.fp8: self._reduce_fp8(i))

    def _reduce_fp8(self, indices: list[int]) -> None:
        counter = self._worker_ps.counter
        before = counter.snapshot()
        stats = self.fp8_reducer.reduce_bucket(indices, self._mu, CommTransport(self._worker_ps, "dp"))
        self._fp8_result = self._fp8_result + stats
        self._fp8_dp_bytes += counter.since(before)["dp_bytes"]

    def _finish_overlapped(self) -> None:
        self._armed = False
        self._hand_over_ready(everything=True)
        self._worker.wait()
        if self.fp8_reducer is not None:
            self.fp8_reducer.finish(self._mu, self._fp8_result, CommTransport(self.ps, "dp"), self._fp8_dp_bytes)
            if self._worker.device.type == "cuda":
                # Scales made on the worker's stream are read on this one from now on.
                stream = torch.cuda.current_stream(self._worker.device)
                for param in self.fp8_grad_params:
                    grad = self.fp8_grads.get(param)
                    if grad is not None:
                        grad.scale.record_stream(stream)

    # ----- overlapped weight all-gather -----------------------------------------------------------
    def gather_async(self, params: list[nn.Parameter], gather, nbytes: int) -> None:
        """Hand `gather(ps)` - the all-gather that writes the new values of `params` - to the
        communication thread; the next forward of a module holding one of them waits for it. The
        step is charged the `nbytes` data-parallel bytes the gather will count (checked when it
        runs), so each iteration's record holds its own step's traffic."""
        counter = self._gather_ps.counter

        def job() -> None:
            before = counter.snapshot()["dp_bytes"]
            gather(self._gather_ps)
            sent = counter.snapshot()["dp_bytes"] - before
            if sent != nbytes:
                raise RuntimeError(f"--overlap-param-gather: a weight all-gather counted {sent} bytes, "
                                   f"{nbytes} were charged to its step")
        self.ps.counter.add("dp", nbytes)
        handle = self._worker.submit(job)
        for param in params:
            self._gathering[id(param)] = handle

    def _wait_for_own_params(self, module: nn.Module, args) -> None:
        if self._gathering:
            for param in module.parameters(recurse=False):
                handle = self._gathering.pop(id(param), None)
                if handle is not None:
                    handle.wait()

    def wait_param_gather(self) -> None:
        """Every weight all-gather handed over so far has run (before a checkpoint is saved, the
        next optimizer step, or anything else that reads weights outside a forward)."""
        if self._gathering:
            handles = {id(h): h for h in self._gathering.values()}
            self._gathering.clear()
            for handle in handles.values():
                handle.wait()

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
