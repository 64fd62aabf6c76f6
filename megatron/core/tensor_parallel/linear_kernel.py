"""The GEMM kernels a tensor-parallel linear runs: what its autograd functions call around their
communication, whatever the precision.

A kernel casts operands (`cast`, `weight_operand`), moves them between ranks (`gather`,
`reduce_scatter_input_grad`), runs the three GEMMs (`fprop`, `dgrad`, `wgrad`) and the bias
gradient, and keeps operands for backward (`save`, `saved`); `linear` is the whole layer with no
communication around it. Two kernels exist: `HighPrecisionKernel` below (the GEMMs autograd
runs for `F.linear`, so results match an ordinary linear bit for bit) and the FP8 one,
`fp8.linear.FP8LinearState`, which the precision plan gives a layer that runs in FP8.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from fp8.tp_comm import SequenceTransport


class LinearKernel(Protocol):
    # Sequence-parallel gathers carry the kernel's operands (cast before the gather, the local
    # piece kept for backward) rather than the high-precision input (cast after, the whole kept).
    gathers_operands: bool

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...
    def cast(self, x2d: torch.Tensor, role: str, transport: SequenceTransport | None = None) -> Any: ...
    def weight_operand(self, weight: torch.Tensor) -> Any: ...
    def gather(self, operand: Any, transport: SequenceTransport) -> Any: ...
    def fprop(self, x: Any, w: Any, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor: ...
    def dgrad(self, dy: Any, w: Any, out_dtype: torch.dtype) -> torch.Tensor: ...
    def wgrad(self, weight: torch.Tensor, dy: Any, x: Any) -> torch.Tensor | None: ...
    def bias_grad(self, dy2d: torch.Tensor) -> torch.Tensor: ...
    def reduce_scatter_input_grad(self, dx: torch.Tensor, transport: SequenceTransport) -> torch.Tensor: ...
    def save(self, ctx, weight: torch.Tensor, bias: torch.Tensor | None, *operands: Any) -> None: ...
    def saved(self, ctx) -> list: ...


class HighPrecisionKernel:
    """GEMMs in the input's dtype, as autograd computes them for `F.linear`: dgrad ``dy @ W``,
    wgrad ``dy^T @ x``, bias ``sum(dy)``. Operands are the tensors themselves."""

    gathers_operands = True  # nothing to cast: the gathered input is the operand

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def cast(x2d: torch.Tensor, role: str, transport: SequenceTransport | None = None) -> torch.Tensor:
        return x2d

    @staticmethod
    def weight_operand(weight: torch.Tensor) -> torch.Tensor:
        return weight

    @staticmethod
    def gather(x: torch.Tensor, transport: SequenceTransport) -> torch.Tensor:
        return transport.all_gather(x.contiguous())

    @staticmethod
    def fprop(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        return F.linear(x, w, bias)

    @staticmethod
    def dgrad(dy: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return dy.mm(w)

    @staticmethod
    def wgrad(weight: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return dy.t().mm(x)

    @staticmethod
    def bias_grad(dy2d: torch.Tensor) -> torch.Tensor:
        return dy2d.sum(0)

    @staticmethod
    def reduce_scatter_input_grad(dx: torch.Tensor, transport: SequenceTransport) -> torch.Tensor:
        return transport.reduce_scatter(dx)

    def save(self, ctx, weight: torch.Tensor, bias: torch.Tensor | None, *operands: torch.Tensor) -> None:
        ctx.save_for_backward(*operands)
        ctx.kernel, ctx.weight, ctx.has_bias = self, weight, bias is not None

    @staticmethod
    def saved(ctx) -> list[torch.Tensor]:
        return list(ctx.saved_tensors)


HIGH_PRECISION = HighPrecisionKernel()
