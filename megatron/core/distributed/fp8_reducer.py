"""The data-parallel reduction of FP8 weight gradients (levels O1 and up), a part of the precision
plan that the data-parallel wrapper runs after backward.

Each FP8 weight's gradient is an E4M3 `ScalingTensor` in the plan's `FP8GradStore`, accumulated
across micro-batches by the FP8 linear itself. `reduce()` averages them over the data-parallel
group in FP8 (`fp8.collectives`: shared minimum scale, auto-scaling factor mu, FP8 payloads, FP32
sums), in place and in rounds of bounded size (`--fp8-chunk-mb`, `fp8.scaling.set_chunk_mb`):
all-reduced into every rank's store (O1, O2), or, under FP8 ZeRO (O3, an `FP8ZeroLayout`),
reduced to the rank that owns each tensor, the others dropping theirs. With one data-parallel
rank nothing is copied: the gradients are their own mean. It returns what it measured: the mu used, the fractions of mu-scaled values that
saturated and underflowed (`ReductionStats`, at every data-parallel size, 1 included) and the
data-parallel bytes it sent; the auto-scaler then picks the next step's mu.

The overlapped reduction (``--overlap-grad-reduce``) runs the same reduction bucket by bucket as
backward completes them (`buckets`, `reduce_bucket`, then `finish` with the summed statistics):
the same values, since each is re-cast, summed over the ranks and cast back on its own.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fp8.autoscale import GradientAutoScaler
from fp8.collectives import ReductionStats, fp8_all_reduce, fp8_reduce_to_owners, shared_scales
from fp8.gradients import FP8GradStore
from fp8.params import SCALE_BYTES
from fp8.formats import E4M3
from fp8.tensor import ScalingTensor
from megatron.core.distributed.fp8_transport import CommTransport
from megatron.core.distributed.fp8_zero import FP8ZeroLayout, backward_buckets
from megatron.core.parallel_state import ParallelState


class FP8GradReducer:
    def __init__(self, params: list[nn.Parameter], store: FP8GradStore, ps: ParallelState, *,
                 autoscaler: GradientAutoScaler | None = None, zero: FP8ZeroLayout | None = None):
        """`params`: the trainable weights with FP8 gradients, in model order; without an
        `autoscaler` the gradients are divided by the data-parallel size before the sum
        (pre-scaling, which cannot overflow)."""
        self.params, self.store, self.ps = list(params), store, ps
        self.autoscaler, self.zero = autoscaler, zero
        self._pending: tuple[float, ReductionStats, int] | None = None  # a finished reduction not yet read
        self.last: dict[str, float] = {}  # what the last settled reduction measured

    def clear(self) -> None:
        self.store.clear()

    def reduce(self) -> None:
        """The data-parallel mean of every FP8 gradient, in place in the store; what it measured
        waits on the device for `settle` (see `finish`)."""
        before = self.ps.counter.snapshot()
        mu = self.mu
        transport = CommTransport(self.ps, "dp")
        if self.zero is not None:
            # One all-reduce of every tensor's scale for all the buckets, one of the counts at the end.
            # Agreed in bucket order, so that each bucket's scales are a slice (no index tensor to copy).
            self._fill_unused(self.zero.params)
            order = [i for bucket in self.zero.buckets for i in bucket]
            shared = shared_scales([self.store.get(self.zero.params[i]) for i in order], transport)
            stats, start = ReductionStats(), 0
            for bucket in self.zero.buckets:
                stats = stats + self.reduce_bucket(bucket, mu, transport, shared=shared[start:start + len(bucket)])
                start += len(bucket)
        else:
            stats = self.reduce_bucket(range(len(self.params)), mu, transport)
        self.finish(mu, stats, transport, self.ps.counter.since(before)["dp_bytes"])

    @property
    def mu(self) -> float:
        """The auto-scaling factor this step's reduction uses (1 / DP without the auto-scaler); a
        reduction still unread is settled first, since its statistics decide it."""
        self.settle()
        return self.autoscaler.mu if self.autoscaler is not None else 1.0 / self.ps.dp_size

    def buckets(self, bucket_numel: int) -> list[list[int]]:
        """Indices into `params` in the groups the reduction may run by as backward fills them:
        FP8 ZeRO's buckets, or (all-reduce) runs of about `bucket_numel` values in backward order.
        Reducing bucket by bucket gives the same bits as one reduction of all: every value is
        re-cast, summed over the ranks in rank order and cast back on its own."""
        if self.zero is not None:
            return [list(b) for b in self.zero.buckets]
        return backward_buckets([p.numel() for p in self.params], bucket_numel)

    def bucket_params(self, indices) -> list[nn.Parameter]:
        """The parameters a bucket of `buckets` (or of FP8 ZeRO's layout) stands for."""
        return [(self.zero.params if self.zero is not None else self.params)[i] for i in indices]

    def _fill_unused(self, params) -> None:
        for param in params:
            if param not in self.store:  # unused this step: a zero gradient (as quantizing zeros gives)
                zeros = torch.zeros(param.shape, dtype=E4M3.dtype, device=param.device)
                self.store.set(param, ScalingTensor(zeros, torch.ones((), device=param.device), E4M3))

    def reduce_bucket(self, indices, mu: float, transport: CommTransport,
                      shared: torch.Tensor | None = None) -> ReductionStats:
        """The mean of the gradients of ``params[i] for i in indices`` (to their owners under
        FP8 ZeRO, where the indices are the layout's); a parameter that got no gradient this step
        counts as zeros. `shared`: the group's minimum scales of these gradients when already
        agreed (else one all-reduce here). Returns this rank's statistics, which `finish` sums
        over the group once for all buckets."""
        params = self.bucket_params(indices)
        self._fill_unused(params)
        grads = [self.store.get(p) for p in params]
        if self.zero is not None:
            owners = [self.zero.owners[i] for i in indices]
            result = fp8_reduce_to_owners(grads, owners, transport, mu=mu, in_place=True, shared=shared,
                                          group_stats=False)
        else:
            result = fp8_all_reduce(grads, transport, mu=mu, in_place=True, shared=shared, group_stats=False)
        for param, reduced in zip(params, result.tensors):
            self.store.set(param, reduced)  # None where another rank owns the tensor (FP8 ZeRO)
        return result.stats

    def finish(self, mu: float, stats: ReductionStats, transport: CommTransport, dp_bytes: int) -> None:
        """The whole reduction's statistics summed over the group (one all-reduce), left on the
        device until `settle` reads them. `dp_bytes`: what the buckets sent."""
        before = self.ps.counter.snapshot()
        stats = stats.summed(transport)
        self._pending = (mu, stats, dp_bytes + self.ps.counter.since(before)["dp_bytes"])

    def settle(self, *values: torch.Tensor) -> list[float]:
        """The last reduction's statistics read to the host together with `values` (0-dim device
        tensors the caller needs there: the step's loss), in one copy - one sync for both - and
        the auto-scaler updated from them; returns `values` as numbers. `last` then holds
        ``{"mu", "overflow_frac", "underflow_frac", "dp_bytes"}`` of that reduction."""
        if self._pending is None:
            return ReductionStats().read_with(values)
        mu, stats, dp_bytes = self._pending
        self._pending = None
        read = stats.read_with(values)
        if self.autoscaler is not None:
            self.autoscaler.update(stats.overflow_frac)
        self.last = {"mu": mu, "overflow_frac": stats.overflow_frac, "underflow_frac": stats.underflow_frac,
                     "dp_bytes": dp_bytes}
        return read

    @property
    def held_bytes(self) -> int:
        """FP8 gradients held between steps (1 byte per value plus a 4-byte scale each): all of
        them at O1 / O2, only the owned ones under FP8 ZeRO (the reduction drops the rest)."""
        params = self.params if self.zero is None else self.zero.owned(self.ps.dp_rank)
        return sum(p.numel() + SCALE_BYTES for p in params)

    @property
    def peak_bytes(self) -> int:
        """FP8 gradients held at the end of backward, before the reduction: all of them."""
        return sum(p.numel() + SCALE_BYTES for p in self.params)
