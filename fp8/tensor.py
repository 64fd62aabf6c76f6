"""ScalingTensor: a low-precision payload with its fp32 scale(s), and the casts in and out."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fp8 import fused
from fp8.formats import FormatSpec, get_spec
from fp8.scaling import (Tile, abs_max, compute_scale, default_chunk_numel, expand_tiles, num_tiles, resolve_tile, row_chunks,
                         tile_amax)


# Per scale tensor (weakly held, by identity: a copy or a reloaded one starts afresh), the holder
# of its reciprocal that every ScalingTensor of that scale shares.
_INVERSES: WeakIdKeyDictionary = WeakIdKeyDictionary()


class ScalingTensor:
    """``data`` (float8 or float16) with ``scale`` so that ``data / scale`` approximates the value.

    ``tile`` says which elements of the 2-D view (leading dimensions flattened) share a scale:
    None for one scale, otherwise ``(tile_rows, tile_cols)``; see `fp8.scaling`.
    """

    __slots__ = ("data", "scale", "spec", "tile", "_inv")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, fmt: str | FormatSpec, tile: Tile = None):
        self.spec = get_spec(fmt)
        assert data.dtype == self.spec.dtype, (data.dtype, self.spec)
        assert scale.dtype == torch.float32, scale.dtype
        if tile is not None:
            assert data.dim() >= 1 and scale.shape == num_tiles(_shape2d(data.shape), tile), (
                data.shape, scale.shape, tile)
        self.data, self.scale, self.tile = data, scale, tile
        # [(the scale's version, its reciprocal)], kept with the scale tensor itself: every cast by
        # one scale (a delayed-scaling scaler's, all of a step's casts) shares one reciprocal.
        holder = _INVERSES.get(scale)
        if holder is None:
            holder = _INVERSES[scale] = [None]
        self._inv: list[tuple[int, torch.Tensor] | None] = holder

    # ----- description -------------------------------------------------------------------------
    @property
    def fmt(self) -> str:
        return self.spec.name

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held: payload plus scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4

    def numel(self) -> int:
        return self.data.numel()

    def dim(self) -> int:
        return self.data.dim()

    def __repr__(self) -> str:
        tile = "tensor" if self.tile is None else f"tile={self.tile}"
        return f"ScalingTensor(shape={tuple(self.shape)}, fmt={self.fmt}, {tile}, device={self.device})"

    # ----- conversions -------------------------------------------------------------------------
    def scale_inv(self) -> torch.Tensor:
        """1 / scale, computed once per value of the scale: tensors cast by one scale (a delayed
        scaler's, for a whole step) and a tensor used by several GEMMs (a weight's FP8 copy in
        forward and backward, an output gradient in both backward GEMMs) take one reciprocal. An in-place change of the scale (a clipped gradient's, an optimizer
        state's) bumps its version and the reciprocal is taken again."""
        version, cached = self.scale._version, self._inv[0]
        if cached is None or cached[0] != version:
            cached = self._inv[0] = (version, self.scale.reciprocal())
        return cached[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # Multiplying by the reciprocal (not dividing by the scale) is what the GEMM kernels do.
        if self.tile is None:
            return (self.data.float() * self.scale_inv()).to(dtype)
        shape2d = _shape2d(self.shape)
        inv = expand_tiles(self.scale_inv(), shape2d, self.tile)
        return (self.data.reshape(shape2d).float() * inv).reshape(self.shape).to(dtype)

    def t(self) -> ScalingTensor:
        """Transpose of a 2-D tensor; exact: the scales are transposed with the payload."""
        assert self.dim() == 2, "ScalingTensor.t() needs a 2-D tensor"
        if self.tile is None:  # the same scale: its reciprocal too
            return self._sharing_scale(self.data.t())
        return ScalingTensor(self.data.t(), self.scale.t(), self.spec, (self.tile[1], self.tile[0]))

    def _sharing_scale(self, data: torch.Tensor) -> ScalingTensor:
        out = ScalingTensor(data, self.scale, self.spec, self.tile)
        out._inv = self._inv
        return out

    def reshape(self, *shape) -> ScalingTensor:
        """Reshape; tiled tensors must keep their last dimension (tiles are over the 2-D view)."""
        data = self.data.reshape(*shape)
        if self.tile is not None and data.shape[-1] != self.shape[-1]:
            raise ValueError("a row- or block-scaled ScalingTensor can only reshape its leading dimensions")
        return self._sharing_scale(data)

    def contiguous(self) -> ScalingTensor:
        return ScalingTensor(self.data.contiguous(), self.scale.contiguous(), self.spec, self.tile)

    def to(self, device: torch.device | str) -> ScalingTensor:
        return ScalingTensor(self.data.to(device), self.scale.to(device), self.spec, self.tile)

    def clone(self) -> ScalingTensor:
        return ScalingTensor(self.data.clone(), self.scale.clone(), self.spec, self.tile)

    def state_dict(self) -> dict:
        """Plain tensors and strings only, so checkpoints load with ``weights_only=True``."""
        tile = torch.tensor(self.tile if self.tile is not None else (0, 0), dtype=torch.int64)
        return {"data": self.data, "scale": self.scale, "fmt": self.fmt, "tile": tile}

    @classmethod
    def from_state_dict(cls, state: dict) -> ScalingTensor:
        tile = tuple(int(v) for v in state["tile"].tolist())
        return cls(state["data"], state["scale"], state["fmt"], None if tile == (0, 0) else tile)


def _shape2d(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return (1, 1)
    cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return (rows, cols)


def cast_saturate(x: torch.Tensor, spec: FormatSpec, inf_to_nan: bool = False) -> torch.Tensor:
    """Round to nearest even, clamping to the format's range: out-of-range finite values become
    +-max rather than NaN or inf, whatever the torch version. NaN stays NaN. Infinities saturate
    too, unless `inf_to_nan`: gradients use that so that an overflow stays visible downstream."""
    x = x.float()
    if inf_to_nan:
        x = torch.where(torch.isinf(x), torch.full_like(x, float("nan")), x)
    return x.clamp(-spec.max, spec.max).to(spec.dtype)


def saturate_(y: torch.Tensor, spec: FormatSpec, inf_to_nan: bool) -> torch.Tensor:
    """`cast_saturate`'s work before the conversion, in place on an FP32 temporary `y`: clamped to
    the format's range (infinities to NaN first with `inf_to_nan`). Returns `y`."""
    if inf_to_nan:
        y.masked_fill_(torch.isinf(y), float("nan"))
    return y.clamp_(-spec.max, spec.max)


def _scaled_cast(x: torch.Tensor, scale: torch.Tensor, spec: FormatSpec, inf_to_nan: bool) -> torch.Tensor:
    """``cast_saturate(x * scale)`` with one FP32 temporary (multiplied and clamped in place). A
    BF16 or FP16 `x` is multiplied by the FP32 scale in one kernel: a 1-element (not 0-dim) scale
    makes the product FP32, each value widened exactly first - the bits of ``x.float() * scale``
    without the FP32 copy of `x` that takes a kernel of its own."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return saturate_(x.float() * scale, spec, inf_to_nan).to(spec.dtype)
    return saturate_(x * (scale.reshape(1) if scale.dim() == 0 else scale), spec, inf_to_nan).to(spec.dtype)


def quantize(
    x: torch.Tensor,
    fmt: str | FormatSpec = "e4m3",
    scale: torch.Tensor | float | None = None,
    granularity: str = "tensor",
    *,
    tile: Tile | str = "auto",
    role: str = "activation",
    margin: int = 0,
    power_of_two: bool = False,
    inf_to_nan: bool = False,
    chunk_numel: int | None = None,
) -> ScalingTensor:
    """Cast `x` to `fmt` with one scale per tile of `granularity` ("tensor", "row", "block").

    With `scale=None` the scale comes from the tensor itself (current scaling). `role="weight"`
    picks 128x128 blocks for the block granularity; `tile` overrides the tile outright.
    `inf_to_nan` turns infinities into NaN instead of saturating them (see `cast_saturate`).
    The amax and the cast take about `chunk_numel` values (whole tiles) at a time.
    """
    spec = get_spec(fmt)
    shape2d = _shape2d(x.shape)
    if tile == "auto":
        tile = resolve_tile(granularity, shape2d, role)
    x2d = x.reshape(shape2d)
    if scale is None:
        scale = compute_scale(tile_amax(x2d, tile, chunk_numel), spec.max, margin, power_of_two)
    else:
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        expected = torch.Size(()) if tile is None else torch.Size(num_tiles(shape2d, tile))
        if scale.shape != expected:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not fit tile {tile} of a "
                             f"{tuple(x.shape)} tensor; expected {tuple(expected)}")
    if fused.active(x.device) and x.numel():
        data = fused.compiled(fused.scaled_cast)(x2d, scale, fused.tile_key(tile, shape2d), spec.max, spec.dtype,
                                                  inf_to_nan)
        return ScalingTensor(data.reshape(x.shape), scale, spec, tile)
    # A bounded chunk of rows at a time (whole tiles each): no FP32 copy of all of `x` exists.
    rows_per_tile = 1 if tile is None else tile[0]
    chunks = list(row_chunks(*shape2d, rows_per_tile, chunk_numel))
    if len(chunks) == 1:  # the cast itself is the payload: no buffer to copy it into
        data = _scaled_cast(x2d, expand_tiles(scale, shape2d, tile), spec, inf_to_nan).contiguous()
        return ScalingTensor(data.reshape(x.shape), scale, spec, tile)
    data = torch.empty(shape2d, dtype=spec.dtype, device=x.device)
    for start, end in chunks:
        chunk_scale = scale if tile is None else scale[start // rows_per_tile:-(-end // rows_per_tile)]
        chunk_scale = expand_tiles(chunk_scale, (end - start, shape2d[1]), tile)
        data[start:end] = _scaled_cast(x2d[start:end], chunk_scale, spec, inf_to_nan)
    return ScalingTensor(data.reshape(x.shape), scale, spec, tile)


def requantize(x: ScalingTensor, *, fmt: str | FormatSpec | None = None, tile: Tile | str = "same",
               margin: int = 0, power_of_two: bool = False) -> ScalingTensor:
    """Re-cast a ScalingTensor with other tiles or another format, from its dequantized value."""
    tile = x.tile if tile == "same" else tile
    return quantize(x.dequantize(), fmt or x.spec, tile=tile, margin=margin, power_of_two=power_of_two)


def accumulate(acc: ScalingTensor | None, x: torch.Tensor, fmt: str | FormatSpec = "e4m3",
               chunk_numel: int | None = None) -> ScalingTensor:
    """``acc + x`` kept in `fmt`: dequantize, add in fp32, re-quantize with a fresh scale.

    Used for FP8 weight gradients across micro-batches. The scale is per tensor. An overflow
    (inf or NaN anywhere) leaves NaN in the result, so the optimizer sees it and skips the step.
    With an `acc` (per-tensor) the sum is formed once where the tensor fits in one chunk (the
    configured FP32 working set), else `chunk_numel` values at a time, twice (its amax, then the
    cast, written over `acc`'s bytes), so no FP32 copy of a larger tensor is made; where casts
    are fused (`fp8.fused`) each chunk's cast is one kernel.
    """
    if acc is None:
        return quantize(x.float(), fmt, inf_to_nan=True)
    assert acc.tile is None and acc.shape == x.shape, (acc.tile, acc.shape, x.shape)
    spec = get_spec(fmt)
    data, inv, flat_x = acc.data.reshape(-1), acc.scale_inv(), x.reshape(-1)

    def total(start: int, end: int) -> torch.Tensor:
        return data[start:end].float() * inv + flat_x[start:end].float()

    numel = flat_x.numel()
    cast_fused = fused.active(x.device)
    chunk_numel = default_chunk_numel(chunk_numel)
    if 0 < numel <= chunk_numel:
        # One chunk: the sum is formed once and cast (the same bits as two passes), in place or
        # by the fused kernel; written over `acc`'s bytes by the converting copy, or new.
        summed = total(0, numel)
        scale = compute_scale(abs_max(summed), spec.max)
        if cast_fused:
            cast = fused.compiled(fused.scaled_cast)(summed, scale, "tensor", spec.max, spec.dtype, True)
            return ScalingTensor(data.copy_(cast).view(x.shape) if acc.spec is spec else cast.view(x.shape),
                                 scale, spec)
        saturate_(summed.mul_(scale), spec, inf_to_nan=True)
        payload = data.copy_(summed) if acc.spec is spec else summed.to(spec.dtype)
        return ScalingTensor(payload.view(x.shape), scale, spec)
    amax = torch.zeros((), device=x.device)
    for start in range(0, numel, chunk_numel):
        amax = torch.maximum(amax, abs_max(total(start, min(start + chunk_numel, numel))))
    scale = compute_scale(amax, spec.max)
    out = data if acc.spec is spec else torch.empty(numel, dtype=spec.dtype, device=x.device)
    for start in range(0, numel, chunk_numel):
        end = min(start + chunk_numel, numel)
        if cast_fused:  # the same operations as cast_saturate(total * scale), in one kernel
            out[start:end] = fused.compiled(fused.scaled_cast)(total(start, end), scale, "tensor", spec.max,
                                                               spec.dtype, True)
        else:
            out[start:end] = cast_saturate(total(start, end) * scale, spec, inf_to_nan=True)
    return ScalingTensor(out.view(x.shape), scale, spec)


def dequantize(x: ScalingTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.dequantize(dtype)
