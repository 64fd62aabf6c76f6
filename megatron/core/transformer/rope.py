"""Rotary position embeddings (RoPE), in the non-interleaved "rotate half" layout."""

from __future__ import annotations

import torch


def rotary_tables(seq_len: int, dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq_len, 1, 1, dim] (broadcast over batch and heads), fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [s, b, heads, dim] by position; computed in at least fp32, returned in x's dtype."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    first, second = wide.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (wide * cos + rotated * sin).to(x.dtype)
