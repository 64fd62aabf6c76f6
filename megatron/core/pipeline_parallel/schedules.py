"""Forward/backward schedules over the micro-batches of one global batch.

The contract, shared by pretraining, SFT and RLHF: the schedule calls
``forward_step(data_iterator, model) -> (output, loss_fn)`` once per micro-batch, and
``loss_fn(output) -> (loss, reported)``: `loss` the micro-batch's scalar loss (a mean over its
tokens) and `reported` a dict of detached scalars to log. The schedule divides each loss by the
number of micro-batches before backward, so the gradients are those of the global batch's
mean loss, and returns the list of `reported` dicts.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from megatron.core.parallel_state import ParallelState

ForwardStep = Callable[[Iterator, torch.nn.Module], tuple[torch.Tensor, Callable]]


def forward_backward_no_pipelining(*, forward_step: ForwardStep, data_iterator: Iterator, model: torch.nn.Module,
                                   num_microbatches: int, forward_only: bool = False) -> list[dict]:
    """Plain gradient accumulation: forward and backward of each micro-batch in turn."""
    reported = []
    for _ in range(num_microbatches):
        with torch.set_grad_enabled(not forward_only):
            output, loss_fn = forward_step(data_iterator, model)
            loss, values = loss_fn(output)
        if not forward_only:
            (loss / num_microbatches).backward()
        reported.append(values)
    return reported


def get_forward_backward_func(ps: ParallelState):
    if ps.pp_size > 1:
        raise ValueError("--pipeline-model-parallel-size > 1 is not implemented yet; use 1 (see README, 'Not done yet')")
    return forward_backward_no_pipelining
