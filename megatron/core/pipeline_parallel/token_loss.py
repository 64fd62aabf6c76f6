"""Token-weighted losses that do not depend on how a global batch is split (Megatron-LM's
--calculate-per-token-loss).

A micro-batch's loss is the sum of its token losses divided by a *denominator*. By default that is
the micro-batch's own token count, so the schedule's mean over micro-batches (and data-parallel
ranks) is a mean of means: a token of a short micro-batch weighs more than one of a long
micro-batch, and the objective changes with --micro-batch-size and the data-parallel size.

With the per-token loss the trainer reads the iteration's micro-batches first, counts the tokens
of the whole global batch (N, one all-reduce over data parallelism) and attaches the denominator
N / (data-parallel size x micro-batches) to each. The schedule's division by the number of
micro-batches and the data-parallel mean of the gradients then give exactly

    loss = (sum of every token loss of the global batch) / N

and its gradient, and the mean of the reported losses is that same number, whatever the split.
Nothing is rescaled after backward, so FP8 gradients, their casts and the loss scale see losses of
the usual magnitude.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState

TOKEN_DENOMINATOR = "token_denominator"


def token_denominator(batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """What a micro-batch's sum of token losses (over `mask`) is divided by: the global batch's
    tokens per micro-batch when the trainer attached it, else the micro-batch's own tokens."""
    given = batch.get(TOKEN_DENOMINATOR)
    if given is not None:
        return given.to(device=mask.device)
    return mask.sum().to(torch.float32).clamp(min=1.0)


def token_mean(values: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """sum(values x mask) / denominator, in float32 at least."""
    wide = values.to(torch.promote_types(values.dtype, torch.float32))
    return (wide * mask.to(wide.dtype)).sum() / denominator.to(wide.dtype)


def with_global_denominator(batches: list[dict], count: Callable[[dict], torch.Tensor], ps: ParallelState
                            ) -> tuple[list[dict], torch.Tensor]:
    """`batches` (this rank's micro-batches of one global batch) each with the per-token
    denominator attached, and the global batch's token count N (float64, on `ps.device`)."""
    # Summed where the batches are (the host for a data loader's), then moved once.
    local = sum(count(batch).to(torch.float64) for batch in batches).to(ps.device)
    total = comm.all_reduce(local, ps, "dp")
    denominator = (total.clamp(min=1.0) / (ps.dp_size * len(batches))).to(torch.float32)
    return [dict(batch, **{TOKEN_DENOMINATOR: denominator}) for batch in batches], total


def read_micro_batches(iterator: Iterator, num_microbatches: int) -> list[dict]:
    return [next(iterator) for _ in range(num_microbatches)]
