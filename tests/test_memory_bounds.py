"""The transient memory of the FP8 gradient reduction and of the FP8 optimizer step is bounded by
their chunk size, not by the model: measured as the process's peak resident set above where it
started (the kernel's high-water mark, reset before each region), with glibc told to return large
blocks as soon as they are freed (`mallopt`), so that what is measured is what was allocated.

Sizes: 24M FP8 gradient values (24 MB) reduced over 2 gloo ranks, and a 4M-value FP16 master
(FP8 / FP16 moments) stepped. One FP32 copy of those gradients is 96 MB, and the step's
whole-tensor FP32 temporaries are about ten 16 MB tensors; in chunks of 1M values (`--fp8-chunk-mb
4`, set here: the default chunk holds these tensors whole) both stay
within a few tens of MB (measured here: about 17, 10 and 44 MB).

The FP8 linear's casts and GEMMs are bounded the same way: an 8M-value BF16 activation (one FP32
copy: 32 MB) casts with about 15 MB above the 8 MB it produces (72 MB cast whole), and a whole
forward and backward stays near what it must hold (measured: 75 MB, against 172 MB with
whole-tensor casts and one CPU GEMM call per product)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_distributed

from megatron.training.host_memory import has_mallopt, set_mmap_threshold

MB = 2**20
CHUNK_MB = 4  # chunks of 1M values (--fp8-chunk-mb 4), smaller than the tensors measured
MEASURABLE = has_mallopt() and Path("/proc/self/clear_refs").exists()


def _status_kb(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def transient_bytes(fn) -> int:
    """Peak resident bytes above the starting point while `fn()` runs."""
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from now
    start = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - start) * 1024


def measure_worker(rank, world_size):
    import fp8
    from fp8.collectives import fp8_all_reduce, fp8_reduce_to_owners
    from fp8.gradients import FP8GradStore
    from fp8.optim import FP8AdamW, make_scaled_fp16_param
    from megatron.core.distributed.fp8_transport import CommTransport
    from megatron.core.parallel_state import ParallelState

    assert set_mmap_threshold(64 * 1024)
    fp8.scaling.set_chunk_mb(CHUNK_MB)
    ps = ParallelState.build(1, 1)
    gen = torch.Generator().manual_seed(rank)
    grads = [fp8.quantize(torch.randn(2048, 2048, generator=gen), "e4m3") for _ in range(6)]
    transport = CommTransport(ps, "dp")
    out = {"all_reduce": transient_bytes(lambda: fp8_all_reduce(grads, transport, mu=0.5, in_place=True)),
           "to_owners": transient_bytes(lambda: fp8_reduce_to_owners(grads, [0, 1, 0, 1, 0, 1], transport,
                                                                      mu=0.5, in_place=True))}
    param = make_scaled_fp16_param(torch.nn.Parameter(torch.randn(2048, 2048, generator=gen)))
    grad = fp8.quantize(torch.randn(2048, 2048, generator=gen) * 1e-3, "e4m3")
    store = FP8GradStore()
    store.set(param, grad)
    opt = FP8AdamW([param], lr=1e-3, fp8_grads=store)
    opt.init_states()
    opt.step()  # the first step allocates nothing more than later ones; measure the second
    out["optimizer_step"] = transient_bytes(opt.step)
    return out


@pytest.mark.distributed
@pytest.mark.skipif(not MEASURABLE, reason="needs glibc's mallopt and /proc/self/clear_refs (Linux)")
def test_fp8_reduction_and_optimizer_step_stay_within_their_chunks():
    for rank, out in enumerate(run_distributed(measure_worker, 2)):
        # Below one FP32 copy of the gradients (96 MB) / of the step's whole-tensor temporaries.
        assert out["all_reduce"] < 48 * MB, (rank, out)
        assert out["to_owners"] < 48 * MB, (rank, out)
        assert out["optimizer_step"] < 80 * MB, (rank, out)


@pytest.mark.skipif(not MEASURABLE, reason="needs glibc's mallopt and /proc/self/clear_refs (Linux)")
def test_fp8_linear_casts_and_gemms_stay_within_their_chunks():
    import fp8
    from fp8.linear import FP8LinearState, fp8_linear

    assert set_mmap_threshold(64 * 1024)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 2048, generator=gen).bfloat16().requires_grad_()
    weight = torch.nn.Parameter(torch.randn(2048, 2048, generator=gen).bfloat16())
    dy = torch.randn(4096, 2048, generator=gen).bfloat16()
    state = FP8LinearState()

    def step():
        fp8_linear(x, weight, None, state).backward(dy)
    before = fp8.scaling.default_chunk_numel()
    fp8.scaling.set_chunk_mb(CHUNK_MB)
    try:
        step()
        x.grad = weight.grad = None
        # What a step must hold at its peak: y and dy-sized BF16 tensors (16 MB each), dx (16 MB), the
        # FP8 operands (8 + 8 + 4 MB) and dw (8 MB): about 76 MB; whole-tensor work adds ~100 MB more.
        step_bytes = transient_bytes(step)
        # The payload (8 MB) and a few chunks' FP32 temporaries; one FP32 copy of x alone is 32 MB.
        cast_bytes = transient_bytes(lambda: fp8.quantize(x.detach(), "e4m3"))
    finally:
        fp8.scaling.set_chunk_mb(before * 4 / MB)
    assert step_bytes < 100 * MB
    assert cast_bytes < 24 * MB
