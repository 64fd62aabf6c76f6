"""FP8 matrix multiply: the native kernels where they apply, an exact emulation everywhere else.

This is the only module that knows about devices and torch versions. `select_path` decides, from
the operands and a `DeviceInfo`, whether a call can go to

- ``scaled_mm``: ``torch._scaled_mm`` with per-tensor scales (CUDA sm89+, and CPU) or row-wise
  scales (CUDA sm90, or sm89 from torch 2.7; BF16 output, the E5M2 operand first);
- ``blockwise``: ``torch.nn.functional.scaled_mm`` (torch 2.10+) with DeepSeek-style 1x128 /
  128x128 scales (CUDA sm90 with cuBLAS 12.9+, E4M3 operands, K a multiple of 512 so that the
  scale tensors need no padding, M a multiple of 8; never with fast accumulation);
- ``emulate``: dequantize both operands (payload times reciprocal scale, exactly what the kernels
  do) and multiply in fp32. On CPU this matches ``torch._scaled_mm`` bit for bit.

cuBLAS wants the first operand row-major and the second column-major; operands in another layout
are copied into shape rather than sent to the emulation.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fp8.scaling import BLOCK_SIZE
from fp8.tensor import ScalingTensor

PATHS = ("scaled_mm", "blockwise", "emulate")
# Values per block of the CPU GEMM's operands (see `_cpu_blocks`): a bound of its own, not the FP8
# chunk of `--fp8-chunk-mb`, since the CPU GEMM's summation order depends on its blocks' shapes.
CPU_GEMM_BLOCK_NUMEL = 1 << 20


@dataclass(frozen=True)
class DeviceInfo:
    type: str
    capability: tuple[int, int] | None = None
    torch_version: tuple[int, int] = (0, 0)
    has_scaled_mm: bool = False
    has_blockwise: bool = False
    cuda_version: tuple[int, int] | None = None


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def device_info(device: torch.device) -> DeviceInfo:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    scaling_type = getattr(F, "ScalingType", None)
    cuda = torch.version.cuda
    return DeviceInfo(
        cuda_version=tuple(int(v) for v in cuda.split(".")[:2]) if cuda else None,
        type=device.type,
        capability=capability,
        torch_version=_torch_version(),
        has_scaled_mm=hasattr(torch, "_scaled_mm"),
        has_blockwise=hasattr(F, "scaled_mm") and hasattr(scaling_type, "BlockWise1x128"),
    )


def _scaling_kind(x: ScalingTensor, contraction_dim: int) -> str:
    """'tensor', 'outer' (one scale per row of a / column of b), 'block1x128', 'block128x128',
    or 'other', for operand `x` of a matmul contracting over `contraction_dim`."""
    if x.tile is None:
        return "tensor"
    rows, cols = x.shape
    tile_outer, tile_inner = (x.tile[1], x.tile[0]) if contraction_dim == 0 else x.tile
    inner = cols if contraction_dim == 1 else rows
    if tile_outer == 1 and tile_inner >= inner:
        return "outer"
    if tile_inner == BLOCK_SIZE and tile_outer in (1, BLOCK_SIZE):
        return "block1x128" if tile_outer == 1 else "block128x128"
    return "other"


def select_path(a: ScalingTensor, b: ScalingTensor, out_dtype: torch.dtype, info: DeviceInfo) -> tuple[str, str]:
    """(path, reason) for ``a @ b``; see the module docstring."""
    if not (a.spec.is_fp8 and b.spec.is_fp8):
        return "emulate", "an operand is not FP8"
    if not info.has_scaled_mm:
        return "emulate", "this torch has no _scaled_mm"
    kind_a, kind_b = _scaling_kind(a, 1), _scaling_kind(b, 0)
    if info.type == "cpu":
        if kind_a == kind_b == "tensor":
            return "scaled_mm", "per-tensor scales on CPU"
        return "emulate", "CPU kernels take per-tensor scales only"
    if info.type != "cuda":
        return "emulate", f"no FP8 kernels on {info.type}"
    return _select_cuda(a, b, kind_a, kind_b, out_dtype, info)


def _select_cuda(a, b, kind_a, kind_b, out_dtype, info) -> tuple[str, str]:
    if info.capability < (8, 9):
        return "emulate", f"FP8 tensor cores need sm89+, this GPU is sm{info.capability[0]}{info.capability[1]}"
    dim_k, dim_n = a.shape[1], b.shape[1]
    if dim_k % 16 or dim_n % 16:
        return "emulate", f"cuBLAS FP8 needs K and N multiples of 16 (K={dim_k}, N={dim_n})"
    if a.spec.name == b.spec.name == "e5m2":
        return "emulate", "cuBLAS has no E5M2 x E5M2 GEMM"
    if kind_a == kind_b == "tensor":
        return "scaled_mm", "per-tensor scales"
    if kind_a == kind_b == "outer":
        rowwise_arch = info.capability >= (9, 0) or info.torch_version >= (2, 7)
        if not rowwise_arch or out_dtype != torch.bfloat16:
            return "emulate", "row-wise scaled GEMMs need sm90 (sm89 from torch 2.7) and a BF16 output"
        if b.spec.name != "e4m3":
            return "emulate", "row-wise scaled GEMMs take E5M2 in the first operand only"
        return "scaled_mm", "row-wise scales"
    if kind_a == "block1x128" and kind_b in ("block1x128", "block128x128"):
        if not info.has_blockwise or info.capability[0] != 9 or (info.cuda_version or (0, 0)) < (12, 9):
            return "emulate", "block-scaled GEMMs need sm90, cuBLAS 12.9+ and torch 2.10+"
        if dim_k % (4 * BLOCK_SIZE) or dim_n % BLOCK_SIZE or out_dtype != torch.bfloat16:
            return "emulate", "block-scaled GEMMs need K a multiple of 512, N of 128, and a BF16 output"
        if a.shape[0] % 8:  # measured on an H200 (torch 2.11, CUDA 13): M = 1 and 3 are refused
            return "emulate", f"block-scaled GEMMs need M a multiple of 8 (M={a.shape[0]})"
        if a.spec.name != "e4m3" or b.spec.name != "e4m3":
            return "emulate", "block-scaled GEMMs take E4M3 operands (use --fp8-format e4m3)"
        return "blockwise", f"{kind_a} x {kind_b} scales"
    return "emulate", f"no kernel for {kind_a} x {kind_b} scaling"


def _with_strides(x: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """`x` laid out with exactly `strides`. Checked outright: is_contiguous() and contiguous()
    ignore the stride of a size-1 dimension, which the CUDA kernels' layout checks do not."""
    if x.stride() == strides:
        return x
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device).copy_(x)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return _with_strides(x, (x.shape[1], 1))


def _col_major(x: torch.Tensor) -> torch.Tensor:
    return _with_strides(x, (1, x.shape[0]))


def _native_scaled_mm(a: ScalingTensor, b: ScalingTensor, out_dtype, bias, fast_accum) -> torch.Tensor:
    # _scaled_mm takes dequantization multipliers: per-tensor (0-dim), or (M, 1) and (1, N),
    # contiguous fp32. Fast accumulation exists on Hopper only.
    scale_a, scale_b = a.scale_inv().contiguous(), b.scale_inv().contiguous()

    def gemm(a_data: torch.Tensor, b_data: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(_row_major(a_data), _col_major(b_data), scale_a=scale_a, scale_b=scale_b,
                                out_dtype=out_dtype, use_fast_accum=fast_accum and a.device.type == "cuda")

    out = _cpu_blocks(gemm, a.data, b.data, out_dtype) if a.device.type == "cpu" else gemm(a.data, b.data)
    return out if bias is None else out.add_(bias.to(out_dtype))


def _cpu_blocks(gemm, a: torch.Tensor, b: torch.Tensor, out_dtype, chunk_numel: int | None = None) -> torch.Tensor:
    """``a @ b`` by `gemm` on blocks of `a`'s rows and `b`'s columns, each about `chunk_numel`
    values. The CPU kernel converts its operands to FP32 before multiplying (a GPU reads FP8
    directly), which would make FP32 copies of a whole activation and weight per call; per block
    those copies stay bounded. Each output block is the same dot products over the whole of K;
    on the CPUs tried (AMD EPYC, ATen's default, AVX2 and AVX-512 kernels) blocks of 256 rows
    and more give one call's bits (the CPU GEMM picks other kernels for very small blocks)."""
    (rows, inner), cols = a.shape, b.shape[1]
    step = max(1, (chunk_numel or CPU_GEMM_BLOCK_NUMEL) // max(inner, 1))
    if step >= rows and step >= cols:
        return gemm(a, b)
    out = torch.empty(rows, cols, dtype=out_dtype, device=a.device)
    for r in range(0, rows, step):
        for c in range(0, cols, step):
            out[r:r + step, c:c + step] = gemm(a[r:r + step], b[:, c:c + step])
    return out


def _native_blockwise(a: ScalingTensor, b: ScalingTensor, out_dtype, bias, fast_accum) -> torch.Tensor:
    """torch.nn.functional.scaled_mm (the v2 API) with the scale layouts cuBLAS reads:
    a's (M, K/128) scales column-major; b's 1x128 scales as (N, K/128) column-major and its
    128x128 scales as (K/128, N/128) column-major. K % 512 == 0 keeps K/128 a multiple of 4."""
    st = F.ScalingType
    scale_a = _col_major(a.scale_inv())            # (M, K/128)
    if _scaling_kind(b, 0) == "block1x128":
        recipe_b, scale_b = st.BlockWise1x128, b.scale_inv().contiguous().t()  # (N, K/128)
    else:
        recipe_b, scale_b = st.BlockWise128x128, _col_major(b.scale_inv())    # (K/128, N/128)
    out = F.scaled_mm(
        _row_major(a.data), _col_major(b.data), scale_a, st.BlockWise1x128, scale_b, recipe_b,
        # cuBLAS refuses fast accumulation with 128x128 weight blocks (measured on an H200), and
        # DeepSeek's recipe promotes partial sums to FP32 on purpose: always the precise one.
        output_dtype=out_dtype, use_fast_accum=False,
    )
    return out if bias is None else out.add_(bias.to(out_dtype))


def emulated_matmul(a: ScalingTensor, b: ScalingTensor, out_dtype=torch.float32, bias=None) -> torch.Tensor:
    out = (a.dequantize(torch.float32) @ b.dequantize(torch.float32)).to(out_dtype)
    return out if bias is None else out.add_(bias.to(out_dtype))


_NATIVE = {"scaled_mm": _native_scaled_mm, "blockwise": _native_blockwise}


def output_dtype_for(a: ScalingTensor, b: ScalingTensor, want: torch.dtype, info: DeviceInfo | None = None) -> torch.dtype:
    """`want`, or BF16 where a kernel takes ``a @ b`` with a BF16 output and not with `want` (the
    row- and block-scaled kernels give BF16 only): the weight-gradient GEMM then runs on the
    tensor cores and rounds to BF16 once, rather than in the FP32 emulation."""
    info = info or device_info(a.device)
    if want == torch.bfloat16 or select_path(a, b, want, info)[0] != "emulate":
        return want
    return torch.bfloat16 if select_path(a, b, torch.bfloat16, info)[0] != "emulate" else want


_warned: set[str] = set()


def warn_emulated(reason: str, device_type: str) -> bool:
    """One line on stderr the first time a GPU's FP8 GEMM falls back to the FP32 emulation for
    `reason` (it runs, but far slower than the tensor cores); returns whether it printed."""
    if device_type != "cuda" or reason in _warned:
        return False
    _warned.add(reason)
    print(f"warning: an FP8 GEMM runs as an FP32 emulation on this GPU ({reason}); training continues, "
          "slower - change the recipe or the shapes named to use the FP8 kernels", file=sys.stderr, flush=True)
    return True


def fp8_matmul(
    a: ScalingTensor,
    b: ScalingTensor,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
    *,
    path: str = "auto",
    fast_accum: bool = False,
) -> torch.Tensor:
    """``a @ b + bias`` for 2-D ScalingTensors ``a`` (M, K) and ``b`` (K, N), in `out_dtype`.

    `path` forces "emulate" (or a native path, which must then be possible); "auto" lets
    `select_path` decide. `fast_accum` allows Hopper's faster, less precise accumulation (for
    forward GEMMs; gradients keep the precise one).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8_matmul needs (M, K) @ (K, N) operands, got {tuple(a.shape)} @ {tuple(b.shape)}")
    if path == "auto":
        path, reason = select_path(a, b, out_dtype, device_info(a.device))
        if path == "emulate":
            warn_emulated(reason, a.device.type)
    elif path not in PATHS:
        raise ValueError(f"unknown GEMM path {path!r}; use one of {PATHS} or 'auto'")
    if path == "emulate":
        return emulated_matmul(a, b, out_dtype, bias)
    return _NATIVE[path](a, b, out_dtype, bias, fast_accum)
