"""Host memory: how glibc's allocator hands freed memory back, for runs on CPU.

glibc serves large blocks with their own mappings, returned to the system when freed, and the rest
from its heap, which keeps what is freed. By default the boundary adapts: it rises to the size of
every large block freed (up to 32 MiB), so after a few steps of a training run nearly every tensor
comes from the heap, and the process's resident set after a step's peak stays near that peak,
fragmented. A fixed boundary (``mallopt(M_MMAP_THRESHOLD)``, or the ``MALLOC_MMAP_THRESHOLD_``
environment variable) stops that: the resident set then follows what is allocated. Measured on
`bench/memory.py`'s 51M-parameter model (docs/benchmarks.md): at 4 MiB every FP8 level peaks at or
below `none` (with the adaptive default O0 reaches 1.03-1.04 of it), but FP8 steps take about 1.5x
as long on CPU, as the FP8 code's chunk temporaries (exactly 4 MiB) become fresh mappings at every
use; thresholds above 4 MiB keep the speed and lose the bound. GPU runs are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
ENV_VAR = "MALLOC_MMAP_THRESHOLD_"
DEFAULT_THRESHOLD_MB = 4.0


def has_mallopt() -> bool:
    return _glibc() is not None


@functools.lru_cache(maxsize=None)
def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") else None


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for this process; False where there is no glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1)


def configure_host_allocator(threshold_mb: float) -> str:
    """What a CPU run does at start: fix the threshold at `threshold_mb` MiB, unless it is 0 (keep
    glibc's adaptive default) or the environment sets it already (glibc read that at start).
    Returns a description for the log."""
    if os.environ.get(ENV_VAR):
        return f"glibc mmap threshold from {ENV_VAR}={os.environ[ENV_VAR]}"
    if threshold_mb <= 0:
        return "glibc mmap threshold adaptive (its default)"
    if not set_mmap_threshold(int(threshold_mb * 2**20)):
        return "no glibc mallopt here; allocator left as it is"
    return f"glibc mmap threshold fixed at {threshold_mb:g} MiB"
