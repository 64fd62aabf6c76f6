"""High-precision column-parallel linear on a sequence-parallel input, as Megatron-LM does it.

Gathering the sequence with `mappings.gather_from_sequence_parallel_region` and then calling
`F.linear` makes autograd keep the whole gathered input for the weight gradient: tp times the
activation memory that sequence parallelism set out to save. Here the all-gather and the GEMM
are one autograd function that keeps only this rank's input chunk and gathers it again in
backward (one more all-gather, counted under "tp" like every other), the trade Megatron-LM
makes. The FP8 counterpart is `fp8.sequence_parallel.column_parallel_fp8_linear`.

The GEMMs are those autograd runs for `F.linear` on the gathered input (dgrad ``dy @ W``,
wgrad ``dy^T @ x``, bias ``sum(dy)``), so results match the gather-then-linear path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState

_GROUP = "tp"


def _gather(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    return comm.all_gather(x.contiguous(), ps, _GROUP, dim=0)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _ColumnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ps):
        ctx.save_for_backward(x, weight)  # the local chunk: the gathered input is not kept
        ctx.ps, ctx.has_bias = ps, bias is not None
        return F.linear(_gather(x, ps), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2d = _rows(dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx_full = dy2d.mm(weight).reshape(*dy.shape[:-1], weight.shape[1])
            dx = comm.reduce_scatter(dx_full, ctx.ps, _GROUP, dim=0)
        if ctx.needs_input_grad[1]:
            dw = dy2d.t().mm(_rows(_gather(x, ctx.ps)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        return dx, dw, db, None


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           ps: ParallelState) -> torch.Tensor:
    """``gather(x) @ weight.T + bias`` for this rank's sequence chunk `x` ([s/tp, b, h]);
    backward re-gathers `x` for the weight gradient and reduce-scatters the input gradient.
    Weight and bias gradients reach autograd as usual (``param.grad`` and its hooks)."""
    if ps.tp_size == 1:
        return F.linear(x, weight, bias)
    return _ColumnFunction.apply(x, weight, bias, ps)
