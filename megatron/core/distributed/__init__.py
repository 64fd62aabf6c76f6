"""Data-parallel machinery; `comm` is the single counted entry point for every collective."""

from megatron.core.distributed import comm
from megatron.core.distributed.comm import (
    CommCounter,
    all_gather,
    all_reduce,
    all_reduce_max,
    all_reduce_scalar,
    all_to_all,
    barrier,
    broadcast,
    recv,
    reduce_scatter,
    ring_bytes,
    send,
    send_recv,
)

__all__ = [
    "comm", "CommCounter", "ring_bytes", "all_reduce", "all_reduce_max", "all_reduce_scalar",
    "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier", "send", "recv", "send_recv",
]
