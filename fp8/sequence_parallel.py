"""FP8 sequence-parallel traffic around an FP8 linear (level O3, paper section 2).

Under sequence parallelism a column-parallel linear all-gathers its input along the sequence
(dim 0 of [s/tp, b, h]) and reduce-scatters the input gradient; a row-parallel linear
reduce-scatters its output and all-gathers the output gradient. Here the all-gathered tensors
travel as FP8, cast once, before the gather, and go into the FP8 GEMMs as they arrive:

- per-tensor recipes: the ranks agree on the amax (MAX over the group) before casting, so every
  piece has the same scale, the gathered bytes are those of casting the whole tensor in one
  process, and delayed-scaling histories stay identical on every rank;
- row / block recipes scale each token row on its own: the scales travel with the payload.

The column layer keeps only its local FP8 input chunk for backward and gathers it again for the
weight gradient. Its input gradient is reduce-scattered in high precision, or in FP8 with
`fp8_reduce_scatter`: the minimum-scale protocol of `fp8.collectives` (every rank casts with its
own scale, all re-cast to the smallest, an all-to-all of bytes, an FP32 sum) without the final
re-cast, since the sum goes on in the gradient's dtype. The row layer's output reduce-scatter
stays in high precision: it is a sum.

Communication goes through a `SequenceTransport`; the training framework supplies one that
counts bytes per process group.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fp8.collectives import Transport, fp32_sum, shared_scale_payloads
from fp8.formats import FormatSpec
from fp8.linear import FP8LinearState, bias_grad, dgrad, fprop, save_operands, saved_operands, wgrad
from fp8.tensor import ScalingTensor, quantize


class SequenceTransport(Transport, Protocol):
    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor: ...  # sum over the group, own chunk of dim 0


def agreed_amax(amax: torch.Tensor, transport: Transport) -> torch.Tensor:
    """The group's largest amax. NaN becomes inf first: MAX is not sure to propagate NaN on every
    backend, and an inf reaches every rank, where the scale then stays as it was (`compute_scale`)."""
    amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax.float())
    return transport.all_reduce_(amax.reshape(1), "max").reshape(amax.shape)


def cast_for_gather(state: FP8LinearState, x2d: torch.Tensor, role: str, transport: Transport) -> ScalingTensor:
    """This rank's rows of a tensor split across the group, cast so that the pieces join."""
    if state.recipe.granularity != "tensor":
        return state.cast(x2d, role)
    return state.cast(x2d, role, reduce_amax=lambda amax: agreed_amax(amax, transport))


def all_gather_fp8(x: ScalingTensor, transport: Transport) -> ScalingTensor:
    """Every rank's rows of 2-D `x` in rank order, as bytes; per-row scales travel in the same
    message, each row's four scale bytes after its payload."""
    if x.tile is None:
        return ScalingTensor(transport.all_gather(x.data.view(torch.uint8)).view(x.spec.dtype), x.scale, x.spec)
    assert x.dim() == 2 and x.tile[0] == 1, "only row-aligned tiles can be gathered by rows"
    cols = x.shape[1]
    packed = torch.cat([x.data.view(torch.uint8), x.scale.contiguous().view(torch.uint8)], dim=1)
    gathered = transport.all_gather(packed)
    data = gathered[:, :cols].contiguous().view(x.spec.dtype)
    scale = gathered[:, cols:].contiguous().view(torch.float32)
    return ScalingTensor(data, scale, x.spec, x.tile)


def fp8_reduce_scatter_sum(t: torch.Tensor, transport: Transport, spec: FormatSpec, *, margin: int = 0,
                           power_of_two: bool = False) -> torch.Tensor:
    """The sum over the group of every rank's `t`, this rank's chunk of dim 0, in `t.dtype`;
    sent as FP8 with the group's minimum scale."""
    size = transport.size
    assert t.shape[0] % size == 0, (tuple(t.shape), size)
    own = quantize(t, spec, margin=margin, power_of_two=power_of_two, inf_to_nan=True)
    (payload,), shared, _ = shared_scale_payloads([own], transport, 1.0, spec)
    received = transport.all_to_all(list(payload.chunk(size)))  # dim 0 leads: byte chunks are sequence chunks
    return (fp32_sum(received, spec) / shared[0]).to(t.dtype).reshape(t.shape[0] // size, *t.shape[1:])


def _reduce_scatter_input_grad(state: FP8LinearState, dx: torch.Tensor, transport: SequenceTransport) -> torch.Tensor:
    if not state.fp8_reduce_scatter:
        return transport.reduce_scatter(dx)
    recipe = state.recipe
    return fp8_reduce_scatter_sum(dx, transport, recipe.fmt.backward, margin=recipe.margin,
                                  power_of_two=recipe.power_of_two)


class _ColumnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, transport):
        x_fp8 = cast_for_gather(state, x.reshape(-1, x.shape[-1]), "input", transport)
        w_fp8 = state.fp8_weight(weight)
        y = fprop(all_gather_fp8(x_fp8, transport), w_fp8, bias, x.dtype)
        save_operands(ctx, state, weight, bias, x_fp8, w_fp8)
        ctx.transport, ctx.x_shape = transport, x.shape
        return y.reshape(transport.size * x.shape[0], *x.shape[1:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        state, transport = ctx.state, ctx.transport
        x_fp8, w_fp8 = saved_operands(ctx)
        dy2d = dy.reshape(-1, dy.shape[-1])
        dy_fp8 = state.cast(dy2d, "grad_output")
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_full = dgrad(state, dy_fp8, w_fp8, dy.dtype).reshape(dy.shape[0], *ctx.x_shape[1:])
            dx = _reduce_scatter_input_grad(state, dx_full, transport)
        if ctx.needs_input_grad[1]:
            dw = wgrad(state, ctx.weight, dy_fp8, all_gather_fp8(x_fp8, transport))
        return dx, dw, bias_grad(ctx, dy2d, 2), None, None


class _RowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, state, transport):
        x_fp8 = state.cast(x.reshape(-1, x.shape[-1]), "input")
        w_fp8 = state.fp8_weight(weight)
        y = fprop(x_fp8, w_fp8, None, x.dtype)
        save_operands(ctx, state, weight, None, x_fp8, w_fp8)
        ctx.transport, ctx.x_shape = transport, x.shape
        return transport.reduce_scatter(y.reshape(*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, dy):
        state, transport = ctx.state, ctx.transport
        x_fp8, w_fp8 = saved_operands(ctx)
        dy_local = cast_for_gather(state, dy.reshape(-1, dy.shape[-1]), "grad_output", transport)
        dy_fp8 = all_gather_fp8(dy_local, transport)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dgrad(state, dy_fp8, w_fp8, dy.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = wgrad(state, ctx.weight, dy_fp8, x_fp8)
        return dx, dw, None, None


def column_parallel_fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               state: FP8LinearState, transport: SequenceTransport) -> torch.Tensor:
    """``gather(x) @ weight.T + bias`` for this rank's sequence chunk `x`, gathered in FP8;
    backward reduce-scatters the input gradient (see the module docstring)."""
    return _ColumnFunction.apply(x, weight, bias, state, transport)


def row_parallel_fp8_linear(x: torch.Tensor, weight: torch.Tensor, state: FP8LinearState,
                            transport: SequenceTransport) -> torch.Tensor:
    """``reduce_scatter(x @ weight.T)`` (no bias: it is added once, after the sum); backward
    gathers the output gradient in FP8."""
    return _RowFunction.apply(x, weight, state, transport)
