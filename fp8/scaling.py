"""From amax to scale, and the scaling recipes.

Convention (as Transformer Engine): ``x_fp8 = cast(x * scale)`` and ``x ~= x_fp8 / scale``, with
``scale = fmt_max / amax / 2**margin``, optionally rounded down to a power of two so that scaling
itself adds no rounding error.

Granularity is described by a *tile* over the 2-D view of a tensor (leading dimensions flattened
into rows, the last dimension as columns): one scale per tile.

- ``tensor``: one scale (``tile=None``, the scale is a 0-dim tensor);
- ``row``: tile ``(1, K)``: one scale per row of an activation, per output channel of a weight;
- ``block``: tile ``(1, 128)`` for activations and gradients, ``(128, 128)`` for weights
  (DeepSeek-V3's fine-grained scaling).

The scale of a tiled tensor has shape ``(ceil(M / tile_rows), ceil(K / tile_cols))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from fp8 import fused
from fp8.formats import Format, FormatSpec, get_spec

Tile = tuple[int, int] | None
GRANULARITIES = ("tensor", "row", "block")
RECIPES = ("delayed", "current", "rowwise", "blockwise")
BLOCK_SIZE = 128

# The chunk: values handled at once by the chunked casts, gradient-reduction rounds and optimizer
# steps, whose FP32 temporaries are a few times this many 4-byte values whatever the tensor's
# size. `--fp8-chunk-mb` sets it in MiB of FP32 values. Each chunk costs kernel launches (several
# per operation of a cast or an optimizer step, one collective per reduction round), so on a GPU,
# where launches cost more than memory, the trainer takes a larger budget; on a CPU, where they
# cost little, a small one keeps the FP8 levels' peak memory below BF16's (bench/memory.py).
DEFAULT_CHUNK_MB = 4
CUDA_CHUNK_MB = 256
_chunk = {"numel": DEFAULT_CHUNK_MB << 18}


def chunk_mb_for(device: torch.device | str) -> int:
    """`--fp8-chunk-mb auto`: the budget for `device`."""
    return CUDA_CHUNK_MB if torch.device(device).type == "cuda" else DEFAULT_CHUNK_MB


def set_chunk_mb(mb: float) -> int:
    """Sets the chunk to `mb` MiB of FP32 values (at least one value); returns it in values."""
    if not mb > 0 or math.isinf(mb):
        raise ValueError(f"--fp8-chunk-mb must be a positive number of MiB, got {mb}")
    _chunk["numel"] = chunk_numel_of(mb)
    return _chunk["numel"]


def chunk_numel_of(mb: float) -> int:
    """`mb` MiB of FP32 values, in values (at least one)."""
    return max(1, int(mb * (1 << 20)) // 4)


def default_chunk_numel(given: int | None = None) -> int:
    """`given`, or where it is None the configured chunk, in values (see `set_chunk_mb`)."""
    return _chunk["numel"] if given is None else given


def row_chunks(rows: int, cols: int, row_multiple: int = 1, chunk_numel: int | None = None):
    """``(start, end)`` row ranges of a ``rows x cols`` matrix, each about `chunk_numel` values
    (default: the configured chunk; at least one row) and a multiple of `row_multiple` rows, so
    that tiles of that many rows never straddle two chunks."""
    chunk_numel = default_chunk_numel(chunk_numel)
    step = max(1, chunk_numel // max(cols, 1) // row_multiple) * row_multiple
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


_SMALLEST_POSITIVE = 2.0**-149  # float32's smallest subnormal
_LARGEST_FINITE = torch.finfo(torch.float32).max
_NUMERATORS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _numerator(value: float, device: torch.device) -> torch.Tensor:
    """A 0-dim FP32 `value` on `device`, made once (a fresh one per cast would be a fill kernel)."""
    key = (value, device)
    if key not in _NUMERATORS:
        _NUMERATORS[key] = torch.full((), value, dtype=torch.float32, device=device)
    return _NUMERATORS[key]


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim FP32 tensor, in one kernel (the infinity norm, computed in FP32): what
    ``x.abs().amax().float()`` gives, NaN propagated, in three (two for FP32 input). Wider or
    other inputs (FP64 references) take that route."""
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32)
    return x.abs().amax().float()


def compute_scale(
    amax: torch.Tensor,
    fmt_max: float,
    margin: int = 0,
    power_of_two: bool = False,
    prev_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Scale that maps ``amax`` to ``fmt_max / 2**margin``; elementwise over tiled amaxes.

    Where amax is zero or non-finite (or the scale would overflow fp32) the previous scale is
    kept (1.0 when there is none): such a tensor carries no information about its range.
    """
    amax = amax.float()
    # A tensor numerator: `number / tensor` would take amax's reciprocal and then multiply, rounding
    # twice; this is the correctly rounded quotient (what Transformer Engine and torchao compute).
    # The numerator is made once per device and value, not on every cast.
    scale = torch.div(_numerator(fmt_max / 2.0**margin, amax.device), amax)
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    # isfinite(amax) & (amax > 0) & isfinite(scale) in 2 kernels instead of 11 on every cast: an
    # amax that is 0 (or so small that the quotient overflows) gives an infinite scale, an
    # infinite amax a zero one (also after rounding down to a power of two), and clamping to the
    # positive finite floats changes exactly those (and NaN, which equals nothing).
    valid = scale.clamp(_SMALLEST_POSITIVE, _LARGEST_FINITE) == scale
    if isinstance(prev_scale, torch.Tensor):
        return torch.where(valid, scale, prev_scale.to(device=scale.device, dtype=torch.float32))
    # The fallback as a tensor made once per device and value (`_numerator`): a Python number would
    # be a fill kernel per call, and torch.as_tensor(1.0, device="cuda") a copy and a stream sync.
    return torch.where(valid, scale, _numerator(1.0 if prev_scale is None else float(prev_scale), scale.device))


def resolve_tile(granularity: str, shape2d: tuple[int, int], role: str = "activation") -> Tile:
    """The tile of `granularity` for a 2-D view of `shape2d`; `role` picks the block shape."""
    if granularity == "tensor":
        return None
    if granularity == "row":
        return (1, shape2d[1])
    if granularity == "block":
        return (BLOCK_SIZE, BLOCK_SIZE) if role == "weight" else (1, BLOCK_SIZE)
    raise ValueError(f"unknown scaling granularity {granularity!r}; use one of {GRANULARITIES}")


def num_tiles(shape2d: tuple[int, int], tile: Tile) -> tuple[int, int]:
    if tile is None:
        return (1, 1)
    return (math.ceil(shape2d[0] / tile[0]), math.ceil(shape2d[1] / tile[1]))


def tile_amax(x2d: torch.Tensor, tile: Tile, chunk_numel: int | None = None) -> torch.Tensor:
    """amax of |x| per tile: 0-dim for `tile=None`, else shape `num_tiles(x2d.shape, tile)`.
    Computed a bounded chunk of rows at a time, so no copy of the whole tensor is made (a whole
    tensor's in one kernel a chunk, `abs_max`); tiled ones as one compiled kernel where casts are
    fused (`fp8.fused`), with the same result."""
    if tile is not None and fused.active(x2d.device) and x2d.numel():  # a whole tensor's is one kernel eagerly
        return fused.compiled(fused.tile_amax)(x2d, fused.tile_key(tile, tuple(x2d.shape)))
    rows, cols = x2d.shape
    if tile is None:
        if x2d.numel() == 0:
            return torch.zeros((), device=x2d.device)
        amax = None  # the first chunk's own (>= 0, or NaN): what max(0, it) would give, without 2 kernels
        for start, end in row_chunks(rows, cols, 1, chunk_numel):
            chunk = abs_max(x2d[start:end])
            amax = chunk if amax is None else torch.maximum(amax, chunk)
        return amax
    tr, tc = tile
    nr, nc = num_tiles((rows, cols), tile)
    out = torch.empty(nr, nc, device=x2d.device)
    for start, end in row_chunks(rows, cols, tr, chunk_numel):
        x = x2d[start:end].abs().float()
        pad_r, pad_c = -(end - start) % tr, nc * tc - cols
        if pad_r or pad_c:
            x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
        out[start // tr:start // tr + x.shape[0] // tr] = x.reshape(-1, tr, nc, tc).amax(dim=(1, 3))
    return out


def expand_tiles(scale: torch.Tensor, shape2d: tuple[int, int], tile: Tile) -> torch.Tensor:
    """Broadcast per-tile values to one value per element of a `shape2d` matrix."""
    if tile is None:
        return scale
    rows, cols = shape2d
    out = scale
    if tile[0] != 1:
        out = out.repeat_interleave(tile[0], dim=0)[:rows]
    if tile[1] != 1:
        out = out.repeat_interleave(tile[1], dim=1)[:, :cols]
    return out


class CurrentScaling:
    """Just-in-time scaling: the scale comes from the tensor being cast."""

    def __init__(self, spec: FormatSpec, margin: int = 0, power_of_two: bool = False):
        self.spec, self.margin, self.power_of_two = spec, margin, power_of_two

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        return compute_scale(amax, self.spec.max, self.margin, self.power_of_two)


class DelayedScaling:
    """Transformer Engine's delayed scaling for one tensor role (per-tensor granularity only).

    A cast uses the scale derived from the amaxes of earlier casts (the history window, reduced
    by ``max`` or ``most_recent``), then records its own amax. The first cast, with an empty
    history, is scaled from its own amax rather than from a guess.

    On its own a scaler records every cast's amax at once (a history row per cast). Joined to a
    `DelayedScalingGroup` (as the trainer joins a model's), it only keeps the largest amax of the
    casts since the group's last `update()`, which then records it (a history row per training
    step) for all the group's scalers in a few kernels: within a step every cast of a tensor uses
    the same scale, as with Transformer Engine's once-per-step amax-and-scale update.
    """

    def __init__(
        self,
        spec: FormatSpec,
        history_len: int = 1024,
        algo: Literal["max", "most_recent"] = "max",
        margin: int = 0,
        power_of_two: bool = False,
    ):
        if history_len < 1:
            raise ValueError(f"amax history length must be >= 1, got {history_len}")
        if algo not in ("max", "most_recent"):
            raise ValueError(f"unknown amax compute algorithm {algo!r}; use 'max' or 'most_recent'")
        self.spec, self.history_len, self.algo = spec, history_len, algo
        self.margin, self.power_of_two = margin, power_of_two
        self.amax_history = torch.zeros(history_len)
        self.scale = torch.ones(())
        self.num_recorded = 0
        self.group: DelayedScalingGroup | None = None
        self.pending: torch.Tensor | None = None  # in a group: the largest amax since its last update

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        """The scale to cast the current tensor with; records its `amax` for later casts (in a
        group: keeps it for the group's next update)."""
        if self.amax_history.device != amax.device:
            self.amax_history = self.amax_history.to(amax.device)
            self.scale = self.scale.to(amax.device)
        if self.num_recorded == 0:
            self.scale = compute_scale(amax, self.spec.max, self.margin, self.power_of_two)
        scale = self.scale
        if self.group is None:
            self.record(amax)
        else:
            # fmax: a NaN amax leaves the largest finite one (an infinite one stays, and the
            # update then records 0 for the step: no information about its range).
            self.pending = amax.float() if self.pending is None else torch.fmax(self.pending, amax)
        return scale

    def record(self, amax: torch.Tensor) -> None:
        # Non-finite amaxes stay out of the window; compute_scale then keeps the previous scale.
        amax = amax.float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # one kernel
        self.amax_history = torch.roll(self.amax_history, 1)
        self.amax_history[0] = amax
        self.num_recorded += 1
        window = self.amax_history[: min(self.num_recorded, self.history_len)]
        reduced = window[0] if self.algo == "most_recent" else window.max()
        self.scale = compute_scale(reduced, self.spec.max, self.margin, self.power_of_two, self.scale)

    def state_dict(self) -> dict:
        return {"amax_history": self.amax_history.clone(), "scale": self.scale.clone(),
                "num_recorded": self.num_recorded}

    def load_state_dict(self, state: dict) -> None:
        self.amax_history = state["amax_history"].clone()
        self.scale = state["scale"].clone()
        self.num_recorded = int(state["num_recorded"])
        self.pending = None


class DelayedScalingGroup:
    """Delayed-scaling histories updated together, once per training step.

    Joined scalers keep the largest amax of their casts until `update()`, which records it in each
    one's history and derives the next scales for all of them at once: a fixed number of kernels
    per format and settings, however many tensors, layers and micro-batches the model has (a
    scaler on its own takes about ten per cast). The result is each scaler's `record` of its
    step's largest amax, to the bit: the window is the history's max (its unrecorded entries are
    zeros, below any amax) or its newest entry, and the scale follows `compute_scale`."""

    def __init__(self, scalers=()):
        self._members: dict[tuple, list[DelayedScaling]] = {}
        for scaler in scalers:
            self.join(scaler)

    def join(self, scaler: DelayedScaling) -> None:
        if scaler.group is not None and scaler.group is not self:
            raise ValueError("a delayed scaler belongs to one DelayedScalingGroup")
        key = (scaler.spec.max, scaler.margin, scaler.power_of_two, scaler.algo, scaler.history_len)
        members = self._members.setdefault(key, [])
        if not any(m is scaler for m in members):
            members.append(scaler)
        scaler.group = self

    def __len__(self) -> int:
        return sum(len(m) for m in self._members.values())

    @torch.no_grad()
    def update(self) -> None:
        """Records every scaler's pending amax (scalers not cast since the last update keep
        their history) and sets their next scales."""
        for (fmt_max, margin, power_of_two, algo, _), members in self._members.items():
            ready = [s for s in members if s.pending is not None]
            if not ready:
                continue
            amax = torch.stack([s.pending for s in ready]).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            history = torch.roll(torch.stack([s.amax_history for s in ready]), 1, dims=1)
            history[:, 0] = amax
            reduced = history[:, 0] if algo == "most_recent" else history.amax(dim=1)
            scales = compute_scale(reduced, fmt_max, margin, power_of_two, torch.stack([s.scale for s in ready]))
            # Each scaler keeps views of the group's new tensors: no copy back.
            for i, scaler in enumerate(ready):
                scaler.amax_history, scaler.scale = history[i], scales[i]
                scaler.num_recorded += 1
                scaler.pending = None


Scaler = CurrentScaling | DelayedScaling


@dataclass(kw_only=True)
class Recipe:
    """What `--fp8-format`, `--fp8-recipe`, `--fp8-margin`, ... ask of every FP8 cast.

    `min_features`: linears whose input or output width is below this stay in high precision,
    since the cost of casting outweighs the faster GEMM there.
    """

    fmt: Format | str = Format.HYBRID
    recipe: str = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0
    power_of_two: bool | None = None
    min_features: int = 128

    def __post_init__(self):
        self.fmt = Format.parse(self.fmt)
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown FP8 recipe {self.recipe!r}; use --fp8-recipe one of {RECIPES}")
        if self.margin < 0:
            raise ValueError(f"--fp8-margin must be >= 0, got {self.margin}")
        if self.min_features < 0:
            raise ValueError(f"FP8 min_features must be >= 0, got {self.min_features}")
        if self.power_of_two is None:
            # torchao's rowwise and DeepSeek/TE's block scaling use power-of-two scales.
            self.power_of_two = self.recipe in ("rowwise", "blockwise")
        DelayedScaling(get_spec("e4m3"), self.amax_history_len, self.amax_compute_algo)  # validates

    @property
    def granularity(self) -> str:
        return {"rowwise": "row", "blockwise": "block"}.get(self.recipe, "tensor")

    def make_scaler(self, spec: FormatSpec | str) -> Scaler:
        spec = get_spec(spec)
        if self.recipe == "delayed":
            return DelayedScaling(spec, self.amax_history_len, self.amax_compute_algo,
                                  self.margin, self.power_of_two)
        return CurrentScaling(spec, self.margin, self.power_of_two)

    def uses_fp8(self, in_features: int, out_features: int) -> bool:
        """Size filter: FP8 only for GEMMs wide enough to gain, with widths the kernels accept."""
        dims = (in_features, out_features)
        return all(d % 16 == 0 and d >= self.min_features for d in dims)
