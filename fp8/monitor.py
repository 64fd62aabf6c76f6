"""Numerics statistics of FP8 casts: overflow and underflow fractions, amax, SQNR.

Used by tests, benchmarks and training logs to see what a cast does to a tensor.
"""

from __future__ import annotations

import math

import torch

from fp8.formats import FormatSpec, get_spec
from fp8.tensor import quantize


def amax(x: torch.Tensor) -> float:
    return float(x.detach().abs().amax()) if x.numel() else 0.0


def overflow_fraction(x: torch.Tensor, fmt: str | FormatSpec, scale: torch.Tensor | float = 1.0) -> float:
    """Fraction of elements at or beyond the format's maximum once scaled (they saturate)."""
    spec = get_spec(fmt)
    scaled = x.detach().float() * scale
    hit = ~(scaled.abs() < spec.max)  # counts inf and NaN too: they carry no usable value
    return float(hit.float().mean()) if x.numel() else 0.0


def underflow_fraction(x: torch.Tensor, fmt: str | FormatSpec, scale: torch.Tensor | float = 1.0) -> float:
    """Fraction of the non-zero elements that the cast flushes to zero."""
    spec = get_spec(fmt)
    scaled = x.detach().float() * scale
    nonzero = scaled != 0
    count = int(nonzero.sum())
    if count == 0:
        return 0.0
    flushed = nonzero & (scaled.clamp(-spec.max, spec.max).to(spec.dtype).float() == 0)
    return float(flushed.sum()) / count


def sqnr_db(x: torch.Tensor, x_approx: torch.Tensor) -> float:
    """Signal to quantization-noise ratio in dB, computed in float64; inf when equal."""
    x64, err = x.detach().double(), (x.detach().double() - x_approx.detach().double())
    noise = float((err * err).sum())
    signal = float((x64 * x64).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cast_stats(x: torch.Tensor, fmt: str | FormatSpec = "e4m3", granularity: str = "tensor",
               scale: torch.Tensor | float | None = None, **quantize_kwargs) -> dict:
    """What quantizing `x` does: amax, scale, overflow/underflow fractions and SQNR of the
    round trip. Per-tensor figures; for tiled granularities the scale reported is the smallest."""
    q = quantize(x, fmt, scale=scale, granularity=granularity, **quantize_kwargs)
    elem_scale = q.scale if q.tile is None else None
    stats = {
        "amax": amax(x),
        "scale": float(q.scale.min()),
        "sqnr_db": sqnr_db(x, q.dequantize()),
    }
    if elem_scale is not None:
        stats["overflow_frac"] = overflow_fraction(x, fmt, elem_scale)
        stats["underflow_frac"] = underflow_fraction(x, fmt, elem_scale)
    else:
        zeros = (q.data.float() == 0) & (x.reshape(q.shape) != 0)
        stats["underflow_frac"] = float(zeros.sum()) / max(1, int((x != 0).sum()))
        stats["overflow_frac"] = float((q.data.float().abs() >= get_spec(fmt).max).float().mean())
    return stats
