"""Column- and row-parallel linears on sequence-parallel activations: one autograd function per
communication pattern, parametrised by the GEMM kernel (`linear_kernel`) and the transport.

Column (input [s/tp, b, h], sequence-sharded): all-gather the input along the sequence, GEMM,
output [s, b, h_out/tp]; backward reduce-scatters the input gradient. Row (input [s, b, h/tp]):
GEMM, reduce-scatter the partial outputs along the sequence; backward all-gathers the output
gradient.

Where the cast sits is the kernel's `gathers_operands`:

- True (high precision, and FP8 at O3): each rank casts its own rows and the operands travel, so
  an FP8 kernel gathers FP8 bytes; the column layer keeps only its local piece for backward and
  gathers it again for the weight gradient - the trade Megatron-LM makes, which keeps sequence
  parallelism's activation memory saving (gathering with a separate mapping would make autograd
  keep the whole gathered input);
- False (FP8 at O0-O2): the high-precision input travels and the whole is cast after the gather;
  the column layer keeps the cast whole (re-gathering would mean casting again).

The bias is added inside the column GEMM; a row layer adds its bias after the sum, outside.
"""

from __future__ import annotations

import torch

from fp8.tp_comm import SequenceTransport
from megatron.core.tensor_parallel.linear_kernel import LinearKernel


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _gathered(kernel: LinearKernel, x2d: torch.Tensor, role: str, transport: SequenceTransport):
    """(the whole tensor's operand, what to keep for a later gather or the whole again)."""
    if kernel.gathers_operands:
        local = kernel.cast(x2d, role, transport)
        return kernel.gather(local, transport), local
    whole = kernel.cast(transport.all_gather(x2d.contiguous()), role)
    return whole, whole


class _ColumnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, kernel: LinearKernel, transport: SequenceTransport):
        x_full, kept = _gathered(kernel, _rows(x), "input", transport)
        y = kernel.fprop(x_full, kernel.weight_operand(weight), bias, x.dtype)
        kernel.save(ctx, weight, bias, kept)
        ctx.transport, ctx.x_shape = transport, x.shape
        return y.reshape(transport.size * x.shape[0], *x.shape[1:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        kernel, transport = ctx.kernel, ctx.transport
        (kept,) = kernel.saved(ctx)
        w_op = kernel.weight_operand(ctx.weight)  # cast again rather than kept since forward
        dy2d = _rows(dy)
        dy_op = kernel.cast(dy2d, "grad_output")
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx_full = kernel.dgrad(dy_op, w_op, dy.dtype).reshape(dy.shape[0], *ctx.x_shape[1:])
            dx = kernel.reduce_scatter_input_grad(dx_full, transport)
        if ctx.needs_input_grad[1]:
            x_full = kernel.gather(kept, transport) if kernel.gathers_operands else kept
            dw = kernel.wgrad(ctx.weight, dy_op, x_full)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = kernel.bias_grad(dy2d)
        return dx, dw, db, None, None


class _RowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, kernel: LinearKernel, transport: SequenceTransport):
        x_op = kernel.cast(_rows(x), "input")
        y = kernel.fprop(x_op, kernel.weight_operand(weight), None, x.dtype)
        kernel.save(ctx, weight, None, x_op)
        ctx.transport, ctx.x_shape = transport, x.shape
        return transport.reduce_scatter(y.reshape(*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, dy):
        kernel, transport = ctx.kernel, ctx.transport
        (x_op,) = kernel.saved(ctx)
        w_op = kernel.weight_operand(ctx.weight)
        dy_op, _ = _gathered(kernel, _rows(dy), "grad_output", transport)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = kernel.dgrad(dy_op, w_op, dy.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = kernel.wgrad(ctx.weight, dy_op, x_op)
        return dx, dw, None, None


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           kernel: LinearKernel, transport: SequenceTransport) -> torch.Tensor:
    """``gather(x) @ weight.T + bias`` for this rank's sequence chunk `x` ([s/tp, b, h])."""
    return _ColumnFunction.apply(x, weight, bias, kernel, transport)


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, kernel: LinearKernel,
                        transport: SequenceTransport) -> torch.Tensor:
    """``reduce_scatter(x @ weight.T)`` along the sequence (no bias: it is added after the sum)."""
    return _RowFunction.apply(x, weight, kernel, transport)
