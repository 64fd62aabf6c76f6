"""`fp8.collectives.Transport` over the framework's counted collectives, so FP8 traffic shows in
the metrics file's `comm` bytes like any other."""

from __future__ import annotations

import torch

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState

_OPS = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
        "max": torch.distributed.ReduceOp.MAX}


class CommTransport:
    def __init__(self, ps: ParallelState, group: str):
        self.ps, self.group = ps, group
        self.size = ps.group_size(group)
        self.rank = ps.group_rank(group)

    def all_reduce_(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return comm.all_reduce(t, self.ps, self.group, op=_OPS[op])

    def all_to_all(self, chunks: list[torch.Tensor], output_numels: list[int] | None = None) -> list[torch.Tensor]:
        shapes = None if output_numels is None else [(n,) for n in output_numels]
        return comm.all_to_all(chunks, self.ps, self.group, output_shapes=shapes)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return comm.all_gather(t, self.ps, self.group, dim=0)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group; this rank's chunk of dim 0 (`fp8.tp_comm.SequenceTransport`)."""
        return comm.reduce_scatter(t.contiguous(), self.ps, self.group, dim=0)
