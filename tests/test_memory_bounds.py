"""The transient memory of the FP8 gradient reduction and of the FP8 optimizer step is bounded by
their chunk size, not by the model: measured as the process's peak resident set above where it
started (the kernel's high-water mark, reset before each region), with glibc told to return large
blocks as soon as they are freed (`mallopt`), so that what is measured is what was allocated.

Sizes: 24M FP8 gradient values (24 MB) reduced over 2 gloo ranks, and a 4M-value FP16 master
(FP8 / FP16 moments) stepped. One FP32 copy of those gradients is 96 MB, and the step's
whole-tensor FP32 temporaries are about ten 16 MB tensors; in chunks of 1M values both stay
within a few tens of MB (measured here: about 17, 10 and 44 MB)."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import pytest
import torch

from distributed import run_distributed

MB = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _glibc():
    name = ctypes.util.find_library("c")
    if not name or not Path("/proc/self/clear_refs").exists():
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") else None


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

    _glibc().mallopt(M_MMAP_THRESHOLD, 64 * 1024)
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
@pytest.mark.skipif(_glibc() is None, reason="needs glibc's mallopt and /proc/self/clear_refs (Linux)")
def test_fp8_reduction_and_optimizer_step_stay_within_their_chunks():
    for rank, out in enumerate(run_distributed(measure_worker, 2)):
        # Below one FP32 copy of the gradients (96 MB) / of the step's whole-tensor temporaries.
        assert out["all_reduce"] < 48 * MB, (rank, out)
        assert out["to_owners"] < 48 * MB, (rank, out)
        assert out["optimizer_step"] < 80 * MB, (rank, out)
