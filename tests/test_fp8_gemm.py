"""fp8_matmul against float64, native against emulated, and the kernel-choice rules."""

import pytest
import torch

import fp8
from fp8.gemm import DeviceInfo, emulated_matmul, select_path

H100 = DeviceInfo(type="cuda", capability=(9, 0), torch_version=(2, 11), has_scaled_mm=True,
                  has_blockwise=True, cuda_version=(12, 9))
H100_CU128 = DeviceInfo(type="cuda", capability=(9, 0), torch_version=(2, 11), has_scaled_mm=True,
                        has_blockwise=True, cuda_version=(12, 8))
ADA = DeviceInfo(type="cuda", capability=(8, 9), torch_version=(2, 11), has_scaled_mm=True,
                 has_blockwise=True, cuda_version=(12, 9))
ADA_TORCH26 = DeviceInfo(type="cuda", capability=(8, 9), torch_version=(2, 6), has_scaled_mm=True)
A100 = DeviceInfo(type="cuda", capability=(8, 0), torch_version=(2, 11), has_scaled_mm=True)
CPU = DeviceInfo(type="cpu", torch_version=(2, 13), has_scaled_mm=True)


def operands(granularity, m=128, k=256, n=192, fmt_a="e4m3", fmt_b="e4m3"):
    torch.manual_seed(0)
    a, w = torch.randn(m, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    a_fp8 = fp8.quantize(a, fmt_a, granularity=granularity)
    w_fp8 = fp8.quantize(w, fmt_b, granularity=granularity, role="weight")
    return a, w, a_fp8, w_fp8


def per_row_sqnr(ref, out):
    return sum(fp8.sqnr_db(r, o) for r, o in zip(ref, out)) / ref.shape[0]


@pytest.mark.parametrize("granularity,min_db", [("tensor", 25), ("row", 25), ("block", 25)])
def test_gaussian_sqnr(granularity, min_db):
    a, w, a_fp8, w_fp8 = operands(granularity)
    out = fp8.fp8_matmul(a_fp8, w_fp8.t(), out_dtype=torch.float32)
    assert fp8.sqnr_db(a @ w.t(), out) > min_db


def outlier_operands():
    """Activations whose tokens span 1e-3..1e3 and a weight with a few huge output channels,
    plus one outlier input channel: what LLM activations look like, and where one scale per
    tensor flushes most of the small values."""
    torch.manual_seed(0)
    m, k, n = 128, 256, 128
    a = torch.randn(m, k, dtype=torch.float64) * torch.logspace(-3, 3, m, dtype=torch.float64)[:, None]
    a[:, 7] *= 50
    w = torch.randn(n, k, dtype=torch.float64)
    w[::16] *= 1000
    return a, w


def test_outliers_row_and_block_beat_tensor_scaling():
    a, w = outlier_operands()
    ref = a @ w.t()
    scores = {}
    for granularity in ("tensor", "row", "block"):
        a_fp8 = fp8.quantize(a, "e4m3", granularity=granularity)
        w_fp8 = fp8.quantize(w, "e4m3", granularity=granularity, role="weight")
        scores[granularity] = per_row_sqnr(ref, fp8.fp8_matmul(a_fp8, w_fp8.t()))
    assert scores["row"] > scores["tensor"] + 10
    assert scores["block"] > scores["tensor"] + 10
    assert scores["row"] > 20 and scores["block"] > 20


def test_native_and_emulated_agree_on_cpu():
    for fmt_a, fmt_b in [("e4m3", "e4m3"), ("e5m2", "e4m3")]:
        _, _, a_fp8, w_fp8 = operands("tensor", fmt_a=fmt_a, fmt_b=fmt_b)
        bias = torch.randn(w_fp8.shape[0])
        for out_dtype in (torch.float32, torch.bfloat16):
            native = fp8.fp8_matmul(a_fp8, w_fp8.t(), out_dtype, bias, path="scaled_mm")
            emulated = fp8.fp8_matmul(a_fp8, w_fp8.t(), out_dtype, bias, path="emulate")
            assert native.dtype == out_dtype
            assert torch.equal(native, emulated)


def test_native_fixes_layout_instead_of_falling_back():
    _, _, a_fp8, w_fp8 = operands("tensor")
    # w_fp8 itself is (N, K) row-major; as the second operand of a @ b it must be column-major.
    b_row_major = w_fp8.t().contiguous()
    a_col_major = fp8.ScalingTensor(a_fp8.data.t().contiguous().t(), a_fp8.scale, "e4m3")
    native = fp8.fp8_matmul(a_col_major, b_row_major, path="scaled_mm")
    assert torch.equal(native, emulated_matmul(a_fp8, w_fp8.t()))


def test_auto_path_on_cpu():
    _, _, a_fp8, w_fp8 = operands("tensor")
    assert select_path(a_fp8, w_fp8.t(), torch.float32, CPU)[0] == "scaled_mm"
    _, _, a_row, w_row = operands("row")
    assert select_path(a_row, w_row.t(), torch.bfloat16, CPU)[0] == "emulate"


@pytest.mark.parametrize("granularity,info,out_dtype,shape,expected", [
    ("tensor", H100, torch.float32, (128, 256, 192), "scaled_mm"),
    ("tensor", ADA, torch.bfloat16, (128, 256, 192), "scaled_mm"),
    ("tensor", A100, torch.bfloat16, (128, 256, 192), "emulate"),
    ("tensor", H100, torch.bfloat16, (128, 250, 192), "emulate"),   # K not a multiple of 16
    ("tensor", H100, torch.bfloat16, (128, 256, 200), "emulate"),   # N not a multiple of 16
    ("tensor", H100, torch.bfloat16, (100, 256, 192), "scaled_mm"),  # M is free
    ("row", H100, torch.bfloat16, (128, 256, 192), "scaled_mm"),
    ("row", H100, torch.float32, (128, 256, 192), "emulate"),       # row-wise needs BF16 out
    ("row", ADA, torch.bfloat16, (128, 256, 192), "scaled_mm"),
    ("row", ADA_TORCH26, torch.bfloat16, (128, 256, 192), "emulate"),
    ("block", H100, torch.bfloat16, (128, 512, 256), "blockwise"),
    ("block", H100, torch.bfloat16, (128, 256, 256), "emulate"),    # K/128 not a multiple of 4
    ("block", H100, torch.bfloat16, (128, 512, 192), "emulate"),    # N not a multiple of 128
    ("block", H100, torch.bfloat16, (1000, 512, 256), "blockwise"),  # M a multiple of 8 (ran on an H200)
    ("block", H100, torch.bfloat16, (3, 512, 256), "emulate"),      # M = 1, 3: refused by cuBLAS on an H200
    ("block", H100_CU128, torch.bfloat16, (128, 512, 256), "emulate"),
    ("block", ADA, torch.bfloat16, (128, 512, 256), "emulate"),
])
def test_cuda_path_rules(granularity, info, out_dtype, shape, expected):
    m, k, n = shape
    _, _, a_fp8, w_fp8 = operands(granularity, m, k, n)
    path, reason = select_path(a_fp8, w_fp8.t(), out_dtype, info)
    assert path == expected, reason


def test_weight_gradient_takes_bf16_where_only_that_has_a_kernel(capsys):
    """Row- and block-scaled GEMMs write BF16 only: a weight gradient asked for in FP32 takes BF16
    on a GPU that has those kernels, and keeps FP32 where a kernel writes it (per-tensor) or none
    runs either way (the CPU emulation). A GPU GEMM that falls back to the emulation says so once."""
    from fp8.gemm import _warned, output_dtype_for, warn_emulated

    for granularity, k, n in (("row", 256, 192), ("block", 512, 256)):
        _, _, a_fp8, w_fp8 = operands(granularity, 128, k, n)
        assert output_dtype_for(a_fp8, w_fp8.t(), torch.float32, H100) == torch.bfloat16, granularity
        assert output_dtype_for(a_fp8, w_fp8.t(), torch.float32, CPU) == torch.float32
        assert select_path(a_fp8, w_fp8.t(), torch.bfloat16, H100)[0] != "emulate"
    _, _, a_fp8, w_fp8 = operands("tensor")
    assert output_dtype_for(a_fp8, w_fp8.t(), torch.float32, H100) == torch.float32
    assert output_dtype_for(a_fp8, w_fp8.t(), torch.float32, A100) == torch.float32  # no FP8 kernel at all
    _warned.discard("a test reason")
    assert warn_emulated("a test reason", "cuda") and not warn_emulated("a test reason", "cuda")
    assert not warn_emulated("another reason", "cpu")
    assert capsys.readouterr().err.count("FP32 emulation") == 1


def test_cuda_rules_on_formats_and_devices():
    _, _, a5, w5 = operands("tensor", fmt_a="e5m2", fmt_b="e5m2")
    assert select_path(a5, w5.t(), torch.bfloat16, H100)[0] == "emulate"
    _, _, a5, w4 = operands("tensor", fmt_a="e5m2")
    assert select_path(a5, w4.t(), torch.bfloat16, H100)[0] == "scaled_mm"
    _, _, a_row5, w_row4 = operands("row", fmt_a="e5m2")
    assert select_path(a_row5, w_row4.t(), torch.bfloat16, H100)[0] == "scaled_mm"
    assert select_path(w_row4, a_row5.t(), torch.bfloat16, H100)[0] == "emulate"  # E5M2 second
    _, _, a_blk5, w_blk4 = operands("block", k=512, n=256, fmt_a="e5m2")
    assert select_path(a_blk5, w_blk4.t(), torch.bfloat16, H100)[0] == "emulate"
    _, _, a_fp8, w_fp8 = operands("tensor")
    fp16 = fp8.quantize(torch.randn(256, 192), "fp16")
    assert select_path(a_fp8, fp16, torch.float32, H100)[0] == "emulate"
    old = DeviceInfo(type="cuda", capability=(9, 0), has_scaled_mm=False)
    assert select_path(a_fp8, w_fp8.t(), torch.float32, old)[0] == "emulate"
    mps = DeviceInfo(type="mps", has_scaled_mm=True)
    assert select_path(a_fp8, w_fp8.t(), torch.float32, mps)[0] == "emulate"
    # A row-scaled operand contracted along its scaled axis has no kernel anywhere.
    _, _, a_row, w_row = operands("row")
    assert select_path(a_row.t().contiguous(), a_row, torch.bfloat16, H100)[0] == "emulate"
    # Row-scaled weight times transposed row-scaled activations is a row-wise GEMM too ...
    assert select_path(w_row, a_row.t(), torch.bfloat16, H100)[0] == "scaled_mm"
    # ... but 128x128-scaled blocks as the first operand have no kernel.
    _, _, a_blk, w_blk = operands("block", n=256)
    assert select_path(w_blk, a_blk.t(), torch.bfloat16, H100)[0] == "emulate"


def test_matmul_rejects_bad_shapes():
    _, _, a_fp8, _ = operands("tensor")
    with pytest.raises(ValueError, match=r"\(M, K\) @ \(K, N\)"):
        fp8.fp8_matmul(a_fp8, a_fp8)
    with pytest.raises(ValueError, match="unknown GEMM path"):
        fp8.fp8_matmul(a_fp8, a_fp8.t(), path="cutlass")


def test_operand_layouts_are_exact_even_with_a_dimension_of_one():
    """torch's CUDA layout checks read every stride, size-1 dimensions included (one decoded
    token's block scales are (1, K/128)); is_contiguous() ignores those, so the layouts are forced."""
    from fp8.gemm import _col_major, _row_major
    one_row = torch.randn(1, 4).to(torch.float8_e4m3fn)
    col = _col_major(one_row)
    assert col.stride() == (1, 1) and torch.equal(col.float(), one_row.float())
    one_col = torch.randn(8, 1).t().t()
    assert _row_major(torch.randn(1, 8).t()).stride() == (1, 1)
    b = torch.randn(8, 4).t()  # already column-major: no copy
    assert _col_major(b).data_ptr() == b.data_ptr() and _row_major(one_col).stride() == (1, 1)
