"""Stochastic rounding of FP32 values to a 16-bit float format (FP16 or BF16).

A 16-bit master weight loses every update smaller than half a unit in its last place: rounding to
nearest sends ``w + delta`` straight back to ``w``. Late in a long schedule that is most updates.
Stochastic rounding picks one of the two neighbouring representable values with probability
proportional to the distance to the other, so ``E[round(x)] = x`` and tiny updates accumulate on
average.

The value to round is passed as ``base + delta`` rather than as one FP32 number. ``base`` is the
current weight (on the 16-bit grid, possibly rescaled by a power of two) and ``delta`` the update:
an FP32 sum ``base + delta`` would itself round away updates below 2**-13 of a FP16 ulp (FP32
keeps only 13 more mantissa bits), whereas the residual ``(base - r) + delta`` keeps ``delta``'s
full relative precision, so even such updates stay unbiased.
"""

from __future__ import annotations

import torch

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def step_toward(r: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The representable neighbour of each 16-bit ``r`` above it (``up``) or below it.

    FP16 and BF16 are sign-magnitude, so on the int16 view of the bits adding one moves away from
    zero and subtracting one moves towards it, through subnormals and into +-inf past the maximum.
    Works for either dtype and on every device (``torch.nextafter`` lacks 16-bit kernels on some).
    """
    assert r.dtype in _SIXTEEN_BIT, r.dtype
    # A zero takes the sign of the direction, so that one step "away from zero" is the smallest
    # subnormal on the correct side.
    zero_bits = torch.where(up, torch.zeros((), dtype=torch.int16, device=r.device),
                            torch.full((), -0x8000, dtype=torch.int16, device=r.device))
    bits = torch.where(r == 0, zero_bits, r.view(torch.int16))
    negative = bits < 0
    away_from_zero = up != negative
    move = torch.where(away_from_zero, 1, -1).to(torch.int16)
    return (bits + move).view(r.dtype)


def stochastic_round(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype,
                     generator: torch.Generator | None) -> torch.Tensor:
    """``base + delta`` (both FP32) rounded stochastically to `dtype` (FP16 or BF16).

    Values beyond the format's range saturate to its maximum. ``generator`` (on the tensors'
    device) makes the result reproducible; None uses torch's global generator.
    """
    if dtype not in _SIXTEEN_BIT:
        raise ValueError(f"stochastic rounding targets float16 or bfloat16, not {dtype}")
    fmt_max = torch.finfo(dtype).max
    nearest = (base + delta).clamp(-fmt_max, fmt_max).to(dtype)
    residual = (base - nearest.float()) + delta
    neighbour = step_toward(nearest, residual > 0)
    gap = (neighbour.float() - nearest.float()).abs()
    # Past +-max the neighbour is inf: the gap is inf and the probability 0, which saturates.
    prob_neighbour = (residual.abs() / gap).clamp(max=1.0)
    uniform = torch.rand(base.shape, generator=generator, device=base.device)
    return torch.where(uniform < prob_neighbour, neighbour, nearest)
