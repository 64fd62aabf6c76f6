"""Fused casts: an FP8 cast as two compiled kernels instead of a loop of PyTorch operations.

The eager cast (`fp8.tensor.quantize`) walks a tensor a million values at a time, and each chunk
takes several operations (amax, multiply, clamp, convert), each a kernel that reads and writes
the whole chunk; on a GPU a large activation costs hundreds of launches and several passes over
memory. Here, with `torch.compile`, a cast is one reduction kernel (the amax per tile; a whole
tensor's is one eager kernel already, `fp8.scaling.abs_max`) and one pointwise kernel (multiply
by the scale, clamp, convert), with no FP32 temporary. The scale
between them is computed eagerly by `fp8.scaling.compute_scale`, so that no approximate division,
``log2`` or ``exp2`` of a compiler's choosing enters it.

Results are the eager cast's to the bit: an amax is exact in any order, and the pointwise kernel
does the eager path's operations (one FP32 product, a clamp, a round-to-nearest-even convert)
element by element. `tests/test_fused_casts.py` checks that on CPU (C++ kernels), and
`bench/gpu_suite.py` on CUDA (Triton kernels).

Mode (`--fp8-fused-casts`): ``auto`` fuses on CUDA when Triton is present (and, should compiling
fail, says so in one line and casts eagerly from then on), ``on`` everywhere torch.compile works
(on CPU it needs a C++ compiler; the first call of each kind compiles for seconds; a failure is an
error), ``off`` never.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading

import torch

MODES = ("auto", "on", "off")
_state = {"mode": "auto"}


def set_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--fp8-fused-casts {mode!r}: use one of {', '.join(MODES)}")
    _state["mode"] = mode


def mode() -> str:
    return _state["mode"]


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def active(device: torch.device) -> bool:
    """Whether casts on `device` go through the compiled kernels."""
    current = _state["mode"]
    if current == "off" or torch.compiler.is_compiling():
        return False
    if current == "on":
        return True
    return device.type == "cuda" and _has_triton()


# A cast may be called from any thread (--overlap-grad-reduce runs a communication thread beside
# the main one); torch.compile's tracing and caches are not made for concurrent use: calls take turns.
_compile_lock = threading.Lock()
# Dynamo's settings are per thread (torch >= 2.12): each thread that casts raises its own limit.
_thread_settings = threading.local()
RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    """Let this thread compile every variant a model needs: autograd's backward threads and the
    communication thread start with dynamo's default limit (8), past which a cast would fall back
    to eager (or, under ``on``, fail)."""
    if not getattr(_thread_settings, "raised", False):
        from torch._dynamo import config as dynamo_config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        _thread_settings.raised = True


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """`fn` compiled once for any shapes, callable from any thread. Every (format, tile, flags)
    combination is a compiled variant of its own; the limit is raised, in each calling thread, so
    that a model's few dozen never fall back to eager (which would still be correct: the same
    operations, uncompiled)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        # Inductor caches its C++ kernels and precompiled headers without regard to this setting, and a
        # cache written under another one fails to compile under it: each setting gets a cache of its own.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"
    compiled_fn = torch.compile(fn, dynamic=True, fullgraph=True)

    @functools.wraps(fn)
    def call(*args):
        with _compile_lock:
            _raise_recompile_limit()
            if _state["mode"] != "auto":
                return compiled_fn(*args)
            try:
                return compiled_fn(*args)
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not end a run that asked for nothing
                _state["mode"] = "off"
                print(f"warning: fused FP8 casts could not be compiled ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); casting eagerly from now on, with the same "
                      "results (--fp8-fused-casts off skips the attempt)", file=sys.stderr, flush=True)
                return fn(*args)
    return call


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two casts' payloads are equal byte for byte, NaN's sign aside (a compiled convert
    may set it where the eager one does not)."""
    nan_a, nan_b = torch.isnan(a.float()), torch.isnan(b.float())
    return torch.equal(nan_a, nan_b) and torch.equal(a.view(torch.uint8)[~nan_a], b.view(torch.uint8)[~nan_b])


def tile_key(tile: tuple[int, int] | None, shape2d: tuple[int, int]) -> str:
    """`tile` as text for the compiled functions, a side that spans the tensor as ``all``: so
    that tile sizes are constants of the compiled code (its innermost loops vectorize), while the
    tensor's own sizes stay symbolic (one compilation for every shape)."""
    if tile is None:
        return "tensor"
    return "x".join("all" if t >= n else str(t) for t, n in zip(tile, shape2d))


def _tile_dims(key: str, rows, cols):
    tr, tc = key.split("x")
    return (rows if tr == "all" else int(tr)), (cols if tc == "all" else int(tc))


def _padded_tiles(x2d: torch.Tensor, key: str) -> torch.Tensor:
    """`x2d` zero-padded to whole tiles, viewed as (tile rows, rows per tile, tile cols, cols per tile)."""
    rows, cols = x2d.shape
    tr, tc = _tile_dims(key, rows, cols)
    pad_r, pad_c = -rows % tr, -cols % tc
    if pad_r or pad_c:
        x2d = torch.nn.functional.pad(x2d, (0, pad_c, 0, pad_r))
    return x2d.reshape(x2d.shape[0] // tr, tr, x2d.shape[1] // tc, tc)


def tile_amax(x2d: torch.Tensor, key: str) -> torch.Tensor:
    """`fp8.scaling.tile_amax` over the whole tensor at once (FP32: 0-dim, or one per tile)."""
    if key == "tensor":
        return x2d.abs().amax().float()
    return _padded_tiles(x2d.abs().float(), key).amax(dim=(1, 3))


def scaled_cast(x2d: torch.Tensor, scale: torch.Tensor, key: str, fmt_max: float, dtype: torch.dtype,
                inf_to_nan: bool) -> torch.Tensor:
    """``convert(clamp(x * scale))`` with `scale` per tile of `key` (`tile_key`); the eager
    `fp8.tensor._scaled_cast`, with the scales broadcast in the kernel rather than expanded in memory."""
    if key in ("tensor", "1xall", "allx1", "allxall"):  # one scale, per row or per column: a plain broadcast
        y = x2d.float() * scale  # (any shape under one scale)
    else:
        rows, cols = x2d.shape
        tiles = _padded_tiles(x2d.float(), key)  # whole tiles: a view; partial ones padded with zeros
        y = (tiles * scale[:, None, :, None]).reshape(tiles.shape[0] * tiles.shape[1], -1)
        if y.shape != x2d.shape:
            y = y[:rows, :cols]
    if inf_to_nan:
        y = torch.where(torch.isinf(y), torch.full_like(y, float("nan")), y)
    return y.clamp(-fmt_max, fmt_max).to(dtype)
