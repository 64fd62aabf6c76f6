"""FP8 linear layer: ``y = x W^T + b`` with all three GEMMs (fprop, dgrad, wgrad) in FP8.

Forward casts x and W to the forward format (E4M3); backward casts the output gradient to the
backward format (E5M2 for `hybrid`, E4M3 for `e4m3`). Only the FP8 copy of x is saved for backward;
W is cast again there (the same bytes), so no layer's FP8 weight copy outlives its use. Bias,
output and input gradient stay in the input's dtype.

Row- and block-scaled operands must have constant scales along the contraction dimension of each
GEMM (that is what the kernels implement). Backward contracts over other dimensions than forward,
so those operands are re-quantized from their FP8 copies along the new axis - the same on every
device, so CPU and GPU runs round alike. Per-tensor scales need none of that.

With ``fp8_wgrad=True`` the weight gradient is not handed to autograd: it is accumulated, in FP8
E4M3 with a per-tensor scale, into the state's `FP8GradStore` (``state.grads``, shared by a whole
model when the precision plan builds it) across backward calls, for the FP8 gradient reduction of
level O1 and above. Clear the store to start a new step.

`fp8_linear(x, weight, bias, state)` is the functional core, with its casting state (recipe,
scalers) in an `FP8LinearState`, which is also the FP8 linear kernel: the
tensor-parallel layers hold one and their sequence-parallel autograd functions
(`megatron.core.tensor_parallel.sequence_parallel`) call its casts and GEMMs around their
communication (FP8 all-gathers with `fp8.tp_comm`). `FP8Linear` is the module around it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8.collectives import Transport
from fp8.gemm import fp8_matmul, output_dtype_for
from fp8.gradients import FP8GradStore
from fp8.params import fp8_weight_tensor, is_fp8_param, param_value
from fp8.scaling import BLOCK_SIZE, CurrentScaling, DelayedScaling, Recipe, resolve_tile, tile_amax
from fp8.tensor import ScalingTensor, quantize, requantize
from fp8.tp_comm import SequenceTransport, agreed_amax, all_gather_fp8, fp8_reduce_scatter_sum

WGRAD_FORMAT = "e4m3"


class _FP8LinearFunction(torch.autograd.Function):
    """The FP8 linear with no communication around it; `state` is the kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        x_fp8 = state.cast(x.reshape(-1, x.shape[-1]), "input")
        y = state.fprop(x_fp8, state.weight_operand(weight), bias, x.dtype)
        state.save(ctx, weight, bias, x_fp8)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        state = ctx.kernel
        (x_fp8,) = state.saved(ctx)
        w_fp8 = state.weight_operand(ctx.weight)  # cast again: the same bytes, not kept in between
        dy2d = dy.reshape(-1, dy.shape[-1])
        dy_fp8 = state.cast(dy2d, "grad_output")
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = state.dgrad(dy_fp8, w_fp8, dy.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = state.wgrad(ctx.weight, dy_fp8, x_fp8)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = state.bias_grad(dy2d)
        return dx, dw, db, None


class FP8LinearState:
    """What one FP8 linear keeps between calls: its recipe and scalers; and the
    FP8 linear kernel (`megatron.core.tensor_parallel.linear_kernel.LinearKernel`): the casts, the
    three GEMMs and how its operands travel, which the framework's tensor-parallel autograd
    functions compose with their communication.

    Weights are scaled from their current value under every recipe: the whole tensor is at hand
    when it is cast, and a delayed scale would clip a weight that grew since the last step.
    """

    def __init__(self, recipe: Recipe | None = None, fp8_wgrad: bool = False, *, fp8_comm: bool = False,
                 fp8_reduce_scatter: bool = False, grads: FP8GradStore | None = None):
        self.recipe = recipe or Recipe()
        self.fp8_wgrad = fp8_wgrad
        # Where FP8 weight gradients accumulate (a store of its own unless the model shares one).
        self.grads = (grads if grads is not None else FP8GradStore()) if fp8_wgrad else None
        # Sequence-parallel traffic of a tensor-parallel layer around this GEMM: all-gathers in FP8
        # (`fp8_comm`), and the input-gradient reduce-scatter in FP8 (`fp8_reduce_scatter`).
        self.fp8_comm, self.fp8_reduce_scatter = fp8_comm, fp8_reduce_scatter
        # The FP8 weight copies of the current step, by weight, when kept (`keep_weight_copies`).
        self._weight_copies: dict[int, tuple[torch.Tensor, ScalingTensor]] | None = None
        fmt = self.recipe.fmt
        self.scalers = {"input": self.recipe.make_scaler(fmt.forward),
                        "weight": CurrentScaling(fmt.forward, self.recipe.margin, self.recipe.power_of_two),
                        "grad_output": self.recipe.make_scaler(fmt.backward)}

    def describe(self) -> str:
        return f"fp8 {self.recipe.recipe}/{self.recipe.fmt.value}" + (", fp8 wgrad" if self.fp8_wgrad else "")

    def state_dict(self) -> dict:
        """Delayed-scaling histories, so that a resumed run casts exactly as the original."""
        return {role: scaler.state_dict() for role, scaler in self.scalers.items()
                if isinstance(scaler, DelayedScaling)}

    def load_state_dict(self, state: dict) -> None:
        for role, scaler_state in state.items():
            self.scalers[role].load_state_dict(scaler_state)

    def cast(self, x2d: torch.Tensor, role: str, transport: Transport | None = None) -> ScalingTensor:
        """`x2d` in the format and tiles of `role`. With a `transport`, `x2d` is this rank's rows
        of a tensor split across its group: under per-tensor recipes the ranks agree on the amax
        to scale (and, with delayed scaling, record) by, so that the pieces join into one FP8
        tensor and histories match; row and block tiles are per row already."""
        spec = self.recipe.fmt.backward if role == "grad_output" else self.recipe.fmt.forward
        tile = resolve_tile(self.recipe.granularity, tuple(x2d.shape), "weight" if role == "weight" else "activation")
        amax = tile_amax(x2d, tile)
        if transport is not None and self.recipe.granularity == "tensor":
            amax = agreed_amax(amax, transport)
        scale = self.scalers[role].scale_for(amax)
        return quantize(x2d, spec, scale=scale, tile=tile)

    def keep_weight_copies(self) -> None:
        """From now on the FP8 copy of a weight is cast once and reused until
        `drop_weight_copies()`, which the owner calls whenever the weight changes (the trainer:
        after each optimizer update)."""
        self._weight_copies = {}

    def drop_weight_copies(self) -> None:
        if self._weight_copies:
            self._weight_copies.clear()

    @torch.no_grad()
    def fp8_weight(self, weight: torch.Tensor) -> ScalingTensor:
        """The FP8 copy of `weight`. By default cast where it is used and not kept: forward casts
        it, backward casts it again (the same bytes: the weight does not change within a step), so
        at most one layer's copy exists at a time; after `keep_weight_copies()` cast once and
        shared by every use until `drop_weight_copies()`. An FP8 weight (level O3) is used as
        stored under per-tensor recipes and re-cast to the recipe's tiles otherwise; an FP16
        master with a per-tensor ``scale`` (levels O1, O2) is cast from its true value, payload /
        scale."""
        copies = self._weight_copies
        if copies is not None and id(weight) in copies and copies[id(weight)][0] is weight:
            return copies[id(weight)][1]
        if is_fp8_param(weight) and self.recipe.granularity == "tensor":
            cast = fp8_weight_tensor(weight)  # the weight's own bytes and scale (kept: one reciprocal)
        else:
            cast = self.cast(param_value(weight), "weight")
        if copies is not None:
            copies[id(weight)] = (weight, cast)
        return cast

    def orient(self, x: ScalingTensor, contraction_dim: int) -> ScalingTensor:
        """`x` with scales constant along `contraction_dim` (whole for row, 128 for block)."""
        if x.tile is None:
            return x
        full = x.shape[contraction_dim]
        want = full if self.recipe.granularity == "row" else BLOCK_SIZE
        if x.tile[contraction_dim] == want or x.tile[contraction_dim] >= full:
            return x
        tile = (want, 1) if contraction_dim == 0 else (1, want)
        return requantize(x, tile=tile, margin=self.recipe.margin, power_of_two=self.recipe.power_of_two)

    def deliver_wgrad(self, weight: torch.Tensor, dw: torch.Tensor) -> torch.Tensor | None:
        if not self.fp8_wgrad:
            return dw.to(weight.dtype)
        self.grads.accumulate(weight, dw, WGRAD_FORMAT)
        return None

    # ----- the kernel: what the tensor-parallel autograd functions call -----------------------
    @property
    def gathers_operands(self) -> bool:
        """Whether sequence-parallel gathers carry FP8 operands (cast before the gather, O3) or
        the high-precision input (cast after)."""
        return self.fp8_comm

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _FP8LinearFunction.apply(x, weight, bias, self)

    def weight_operand(self, weight: torch.Tensor) -> ScalingTensor:
        return self.fp8_weight(weight)

    def gather(self, x: ScalingTensor, transport: Transport) -> ScalingTensor:
        return all_gather_fp8(x, transport)

    @staticmethod
    def fprop(x_fp8: ScalingTensor, w_fp8: ScalingTensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
        return fp8_matmul(x_fp8, w_fp8.t(), out_dtype=out_dtype, bias=bias, fast_accum=True)

    def dgrad(self, dy_fp8: ScalingTensor, w_fp8: ScalingTensor, out_dtype: torch.dtype) -> torch.Tensor:
        return fp8_matmul(dy_fp8, self.orient(w_fp8, 0), out_dtype=out_dtype)

    def wgrad(self, weight: torch.Tensor, dy_fp8: ScalingTensor, x_fp8: ScalingTensor) -> torch.Tensor | None:
        """The weight gradient, or None once it is kept in FP8 in the gradient store. Without FP8
        gradients the GEMM writes the weight's dtype itself (one rounding of the FP32 sum, as
        writing FP32 and converting would do), so no FP32 copy of the gradient is made. With them
        it writes FP32 for the FP8 accumulation, or BF16 where only that output has a kernel
        (row- and block-scaled GEMMs on a GPU, `fp8.gemm.output_dtype_for`)."""
        a, b = self.orient(dy_fp8, 0).t(), self.orient(x_fp8, 0)
        out_dtype = output_dtype_for(a, b, torch.float32) if self.fp8_wgrad else weight.dtype
        return self.deliver_wgrad(weight, fp8_matmul(a, b, out_dtype=out_dtype))

    @staticmethod
    def bias_grad(dy2d: torch.Tensor) -> torch.Tensor:
        # A BF16/FP16 sum accumulates in FP32 and rounds once: the value of summing an FP32 copy
        # (checked to the bit), without making one.
        return dy2d.sum(0)

    def reduce_scatter_input_grad(self, dx: torch.Tensor, transport: SequenceTransport) -> torch.Tensor:
        if not self.fp8_reduce_scatter:
            return transport.reduce_scatter(dx)
        recipe = self.recipe
        return fp8_reduce_scatter_sum(dx, transport, recipe.fmt.backward, margin=recipe.margin,
                                      power_of_two=recipe.power_of_two)

    def save(self, ctx, weight: torch.Tensor, bias: torch.Tensor | None, *operands: ScalingTensor) -> None:
        """Keeps FP8 `operands` (payloads and scales only) and what backward needs besides."""
        ctx.save_for_backward(*[t for op in operands for t in (op.data, op.scale)])
        # With each scale's reciprocal when forward took it (a 0-dim tensor): backward's GEMM reuses it.
        ctx.fp8_layouts = [(op.spec, op.tile, op._inv) for op in operands]
        ctx.kernel, ctx.weight, ctx.has_bias = self, weight, bias is not None

    @staticmethod
    def saved(ctx) -> list[ScalingTensor]:
        saved, operands = ctx.saved_tensors, []
        for i, (spec, tile, inv) in enumerate(ctx.fp8_layouts):
            operands.append(ScalingTensor(saved[2 * i], saved[2 * i + 1], spec, tile))
            operands[-1]._inv = inv
        return operands


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               state: FP8LinearState) -> torch.Tensor:
    """``x @ weight.T + bias`` with FP8 GEMMs in forward and backward (see the module docstring)."""
    return state.linear(x, weight, bias)


class FP8Linear(nn.Module):
    """Drop-in for `nn.Linear` whose GEMMs run in FP8 according to a `Recipe`.

    Linears that the recipe's size filter rejects run as an ordinary linear in the input's dtype
    (BF16 in a BF16 model).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 recipe: Recipe | None = None, fp8_wgrad: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.fp8 = FP8LinearState(recipe, fp8_wgrad)
        self.use_fp8 = self.fp8.recipe.uses_fp8(in_features, out_features)

    @property
    def recipe(self) -> Recipe:
        return self.fp8.recipe

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe | None = None, fp8_wgrad: bool = False) -> FP8Linear:
        """An FP8Linear sharing `linear`'s parameters (so optimizers and state dicts carry over)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     recipe=recipe, fp8_wgrad=fp8_wgrad, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def extra_repr(self) -> str:
        mode = self.fp8.describe() if self.use_fp8 else "high precision (size filter)"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"

    def get_extra_state(self) -> dict:
        return self.fp8.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.fp8.load_state_dict(state)

    def fp8_weight(self) -> ScalingTensor:
        return self.fp8.fp8_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_fp8:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return fp8_linear(x, self.weight, self.bias, self.fp8)
