"""Number formats used by FP8-LM: E4M3 and E5M2 (OCP FP8), and FP16 for scaled master weights.

A `FormatSpec` describes one storage format; a `Format` is the choice the user makes with
`--fp8-format`: which FP8 format carries the forward tensors (weights, activations) and which
carries the backward ones (output gradients).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FormatSpec:
    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    has_nan: bool

    @property
    def is_fp8(self) -> bool:
        return self.dtype.itemsize == 1

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def __repr__(self) -> str:
        return f"FormatSpec({self.name})"


# E4M3 (the "fn" variant): no infinities, a single NaN pattern per sign (S.1111.111), so the top
# binade reaches 1.75 * 2**8 = 448.
E4M3 = FormatSpec(
    name="e4m3", dtype=torch.float8_e4m3fn, exponent_bits=4, mantissa_bits=3, bias=7,
    max=448.0, min_normal=2.0**-6, min_subnormal=2.0**-9, has_inf=False, has_nan=True,
)
# E5M2 follows IEEE conventions: the top exponent holds inf and NaNs, so max = 1.75 * 2**15.
E5M2 = FormatSpec(
    name="e5m2", dtype=torch.float8_e5m2, exponent_bits=5, mantissa_bits=2, bias=15,
    max=57344.0, min_normal=2.0**-14, min_subnormal=2.0**-16, has_inf=True, has_nan=True,
)
FP16 = FormatSpec(
    name="fp16", dtype=torch.float16, exponent_bits=5, mantissa_bits=10, bias=15,
    max=65504.0, min_normal=2.0**-14, min_subnormal=2.0**-24, has_inf=True, has_nan=True,
)

_SPECS = {spec.name: spec for spec in (E4M3, E5M2, FP16)}
_SPECS_BY_DTYPE = {spec.dtype: spec for spec in (E4M3, E5M2, FP16)}


def get_spec(fmt: str | torch.dtype | FormatSpec) -> FormatSpec:
    """Resolve a format name ("e4m3", "e5m2", "fp16"), a torch dtype or a spec to its spec."""
    if isinstance(fmt, FormatSpec):
        return fmt
    spec = _SPECS_BY_DTYPE.get(fmt) if isinstance(fmt, torch.dtype) else _SPECS.get(str(fmt).lower())
    if spec is None:
        raise ValueError(f"unknown number format {fmt!r}; use one of {sorted(_SPECS)}")
    return spec


class Format(enum.Enum):
    """`--fp8-format`: hybrid = E4M3 forward, E5M2 for gradients; e4m3 = E4M3 everywhere."""

    HYBRID = "hybrid"
    E4M3 = "e4m3"

    @property
    def forward(self) -> FormatSpec:
        return E4M3

    @property
    def backward(self) -> FormatSpec:
        return E5M2 if self is Format.HYBRID else E4M3

    @classmethod
    def parse(cls, value: str | Format) -> Format:
        if isinstance(value, Format):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown FP8 format {value!r}; use --fp8-format hybrid or --fp8-format e4m3"
            ) from None


HYBRID = Format.HYBRID
