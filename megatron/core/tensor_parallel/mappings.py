"""Autograd-aware tensor-parallel communication: each forward collective has its adjoint in backward.

Activations are [sequence, batch, hidden] as in Megatron, so sequence parallelism splits dim 0 and
tensor parallelism splits the last dim. Every function takes the `ParallelState` explicitly and
is the identity when the tensor-parallel size is 1. All traffic goes through `comm` and is counted
under "tp".
"""

from __future__ import annotations

import torch

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState

_GROUP = "tp"


def _split(x: torch.Tensor, ps: ParallelState, dim: int, what: str) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim`."""
    if x.shape[dim] % ps.tp_size != 0:
        raise ValueError(f"{what} of size {x.shape[dim]} is not divisible by tensor-parallel size "
                         f"{ps.tp_size}; choose a multiple of {ps.tp_size} (or change "
                         f"--tensor-model-parallel-size)")
    return x.chunk(ps.tp_size, dim=dim)[ps.tp_rank].contiguous()


def _all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    # Out of place: the input may be saved for another op's backward.
    return comm.all_reduce(x.clone(memory_format=torch.contiguous_format), ps, _GROUP)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.ps), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        return _all_reduce(x, ps)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _split(x, ps, -1, "last dimension")

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad.contiguous(), ctx.ps, _GROUP, dim=-1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return comm.all_gather(x.contiguous(), ps, _GROUP, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.ps, -1, "last dimension"), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return _split(x, ps, 0, "sequence length")

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad.contiguous(), ctx.ps, _GROUP, dim=0), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps, tensor_parallel_output_grad):
        ctx.ps, ctx.reduce_grad = ps, tensor_parallel_output_grad
        return comm.all_gather(x.contiguous(), ps, _GROUP, dim=0)

    @staticmethod
    def backward(ctx, grad):
        # A tensor-parallel consumer (column-parallel linear) leaves each rank a partial gradient of
        # the full sequence, which must be summed; a replicated consumer leaves the full gradient.
        if ctx.reduce_grad:
            return comm.reduce_scatter(grad.contiguous(), ctx.ps, _GROUP, dim=0), None, None
        return _split(grad, ctx.ps, 0, "sequence length"), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return comm.reduce_scatter(x.contiguous(), ps, _GROUP, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad.contiguous(), ctx.ps, _GROUP, dim=0), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward identity; backward all-reduces the gradient (input replicated into a TP region)."""
    return x if ps.tp_size == 1 else _CopyToTP.apply(x, ps)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward all-reduce of partial sums (row-parallel output); backward identity."""
    return x if ps.tp_size == 1 else _ReduceFromTP.apply(x, ps)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward keeps this rank's chunk of the last dim; backward all-gathers it."""
    return x if ps.tp_size == 1 else _ScatterToTP.apply(x, ps)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward all-gathers the last dim; backward keeps this rank's chunk."""
    return x if ps.tp_size == 1 else _GatherFromTP.apply(x, ps)


def scatter_to_sequence_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward keeps this rank's chunk of the sequence (dim 0); backward all-gathers it."""
    return x if ps.tp_size == 1 else _ScatterToSP.apply(x, ps)


def gather_from_sequence_parallel_region(x: torch.Tensor, ps: ParallelState,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """Forward all-gathers the sequence (dim 0); backward reduce-scatters the gradient, or just
    splits it when the consumer is replicated (``tensor_parallel_output_grad=False``)."""
    if ps.tp_size == 1:
        return x
    return _GatherFromSP.apply(x, ps, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Forward sums partial outputs and keeps this rank's sequence chunk; backward all-gathers."""
    return x if ps.tp_size == 1 else _ReduceScatterToSP.apply(x, ps)
