"""How a parameter is stored, and the value it stands for.

Three kinds of parameter exist across the precision levels, each its own type:

- an ordinary ``nn.Parameter`` (FP32, BF16): its value is itself;
- a `fp8.optim.ScaledFP16Parameter`, an FP16 master with a per-tensor scale (levels O1, O2;
  `fp8.optim.make_scaled_fp16_param`): value = ``payload.float() / scale``;
- an `FP8WeightParameter` (level O3): E4M3 payload, a 0-dim FP32 ``.scale`` and its `WeightCast`,
  value = ``payload.float() / scale``, one byte per element. It is what the FP8 GEMMs read
  directly; its FP16 master lives on one data-parallel rank (FP8 ZeRO), which re-quantizes it
  after every step with `quantize_fp8_weight`, using the margin and power-of-two rule the
  parameter was made with (those of the layer's recipe), so every rank casts alike.

`param_value` / `set_param_value` read and write the value whatever the storage, which is what
checkpoints hold: a checkpoint does not depend on how a level stores weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fp8.formats import E4M3
from fp8.optim import is_scaled_fp16, scaled_value, to_scaled_fp16
from fp8.scaling import abs_max, compute_scale
from fp8.scaling import default_chunk_numel
from fp8.tensor import ScalingTensor, cast_saturate

SCALE_BYTES = 4


@dataclass(frozen=True)
class WeightCast:
    """How an FP8 weight is cast from its value: the recipe's margin and power-of-two rule."""

    margin: int = 0
    power_of_two: bool = False


class FP8WeightParameter(nn.Parameter):
    """A weight stored in FP8 E4M3 with a per-tensor FP32 ``scale`` (value = ``data.float() /
    scale``, one byte per element) and the `WeightCast` every re-quantization uses, so that all
    ranks cast alike. Its kind is its type (`is_fp8_param`)."""

    scale: torch.Tensor
    cast: WeightCast

    def __deepcopy__(self, memo):
        copy = type(self)(self.data.clone(), self.requires_grad)
        copy.scale, copy.cast = self.scale.clone(), self.cast
        memo[id(self)] = copy
        return copy


def is_fp8_param(p: torch.Tensor) -> bool:
    """Whether `p` is an FP8 weight."""
    return isinstance(p, FP8WeightParameter)


def quantize_fp8_weight(value: torch.Tensor, cast: WeightCast,
                        prev_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(payload, scale)``: `value` as E4M3 with a per-tensor scale from its amax under `cast`.
    A zero (or non-finite) amax keeps `prev_scale`."""
    x = value.detach().float()
    amax = abs_max(x) if x.numel() else torch.zeros((), device=x.device)
    scale = compute_scale(amax, E4M3.max, cast.margin, cast.power_of_two, prev_scale)
    return cast_saturate(x * scale, E4M3), scale.reshape(())


def fp8_weight_from_master(master: torch.Tensor, cast: WeightCast, prev_scale: torch.Tensor | None = None,
                           chunk_numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_weight` of a master's true value (`scaled_value`), read `chunk_numel` values
    at a time, twice (the amax, then the cast): the same bytes and scale without an FP32 copy of
    the whole tensor."""
    chunk_numel = default_chunk_numel(chunk_numel)
    flat, numel = master.detach().reshape(-1), master.numel()
    inv = master.scale.reciprocal() if is_scaled_fp16(master) else None

    def value(start: int, end: int) -> torch.Tensor:
        piece = flat[start:end].float()
        return piece * inv if inv is not None else piece

    amax = torch.zeros((), device=master.device)
    for start in range(0, numel, chunk_numel):
        amax = torch.maximum(amax, abs_max(value(start, min(start + chunk_numel, numel))))
    scale = compute_scale(amax, E4M3.max, cast.margin, cast.power_of_two, prev_scale)
    payload = torch.empty(numel, dtype=E4M3.dtype, device=master.device)
    for start in range(0, numel, chunk_numel):
        end = min(start + chunk_numel, numel)
        payload[start:end] = cast_saturate(value(start, end) * scale, E4M3)
    return payload.view(master.shape), scale.reshape(())


def make_fp8_param(param: nn.Parameter, cast: WeightCast) -> FP8WeightParameter:
    """Store `param` (any kind) as an FP8 weight in place: one byte per element plus a scale.
    The Parameter object stays the same (optimizers and names keep it); its type says its kind."""
    value = param_value(param).float()
    payload, scale = quantize_fp8_weight(value, cast)
    param.data = payload
    param.__class__ = FP8WeightParameter
    param.scale, param.cast = scale, cast
    return param


def fp8_weight_tensor(param: torch.Tensor) -> ScalingTensor:
    """An FP8 weight as a `ScalingTensor` sharing its storage (no copy)."""
    assert is_fp8_param(param)
    return ScalingTensor(param.detach(), param.scale, E4M3)


def param_value(param: torch.Tensor) -> torch.Tensor:
    """The value `param` stands for (FP32 for scaled kinds, the tensor itself otherwise)."""
    if is_fp8_param(param):
        return param.detach().float() / param.scale
    return scaled_value(param) if is_scaled_fp16(param) else param.detach()


@torch.no_grad()
def set_param_value(param: torch.Tensor, value: torch.Tensor) -> None:
    """Make `param` stand for `value`, re-quantizing scaled kinds with a fresh scale."""
    if is_fp8_param(param):
        payload, scale = quantize_fp8_weight(value, param.cast, param.scale)
    elif is_scaled_fp16(param):
        payload, scale = to_scaled_fp16(value.float())
    else:
        param.copy_(value)
        return
    param.copy_(payload)
    param.scale.copy_(scale.reshape(param.scale.shape))


def param_nbytes(param: torch.Tensor) -> int:
    """Bytes `param` holds: payload plus its scale where it has one."""
    scaled = is_fp8_param(param) or is_scaled_fp16(param)
    return param.numel() * param.element_size() + (SCALE_BYTES if scaled else 0)
