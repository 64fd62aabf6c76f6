"""Forward/backward schedules over the micro-batches of one global batch.

The contract, shared by pretraining, SFT and RLHF: the schedule calls
``forward_step(data_iterator, model) -> (output, loss_fn)`` once per micro-batch, and
``loss_fn(output) -> (loss, reported)``: `loss` the micro-batch's scalar loss (a mean over its
tokens) and `reported` a dict of detached scalars to log. The schedule divides each loss by the
number of micro-batches before backward, so the gradients are those of the global batch's
mean loss, and returns the list of `reported` dicts.

Under pipeline parallelism the same contract holds on every stage, with three additions (as in
Megatron): the schedule hands a stage the previous stage's activation through
``model.set_input_tensor(tensor)`` before calling `forward_step` (which reads its batch from the
iterator on every stage and so stays layout-agnostic); only the last stage applies `loss_fn`; and
`reported` is returned on the last stage only (an empty list elsewhere; `reported_mean` gives
every rank the loss to log).

A pipelined schedule is written as a *plan*: the list of forwards, backwards and exchanges one
stage performs, built from its place in the pipeline alone (`one_f_one_b_plan`,
`interleaved_plan`). One executor runs any plan, and tests can check that the plans of all
stages pair every send with a receive, in order, without deadlock, without starting processes.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import torch

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

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


# ----- plans -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    step: int  # index into this stage's forward order (see PipelineGeometry)


@dataclass(frozen=True)
class Backward:
    step: int  # index into this stage's backward order


@dataclass(frozen=True)
class Exchange:
    """One paired exchange with the neighbours. Sends take the oldest output not yet sent."""

    send_next: bool = False  # an activation to the next stage
    send_prev: bool = False  # an input gradient to the previous stage
    recv_prev: bool = False  # an activation from the previous stage
    recv_next: bool = False  # an output gradient from the next stage

    @property
    def is_empty(self) -> bool:
        return not (self.send_next or self.send_prev or self.recv_prev or self.recv_next)


Action = Forward | Backward | Exchange


@dataclass(frozen=True)
class PipelineGeometry:
    """Where one stage sits, and which (model chunk, micro-batch) its k-th forward or backward is.

    With `num_chunks` virtual stages per rank (interleaving), model chunk c of rank r holds
    virtual stage c * pp_size + r. Micro-batches go through in groups of pp_size: a group passes
    chunk 0, then chunk 1, ..., before the next group starts; backward visits chunks in reverse.
    """

    pp_size: int
    pp_rank: int
    num_microbatches: int
    num_chunks: int = 1

    @property
    def num_steps(self) -> int:
        return self.num_microbatches * self.num_chunks

    def chunk(self, step: int, forward: bool = True) -> int:
        # Python's floor division keeps this right for the negative steps the plans look back to.
        index = (step // self.pp_size) % self.num_chunks
        return index if forward else self.num_chunks - 1 - index

    def microbatch(self, step: int) -> int:
        group = self.pp_size * self.num_chunks
        return (step // group) * self.pp_size + step % self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def is_first_virtual(self, chunk: int) -> bool:
        """Whether `chunk` here is the model's first piece (it reads tokens, receives nothing)."""
        return self.is_first_stage and chunk == 0

    def is_last_virtual(self, chunk: int) -> bool:
        """Whether `chunk` here is the model's last piece (it computes the loss, sends nothing)."""
        return self.is_last_stage and chunk == self.num_chunks - 1


def _drop_empty(plan: list[Action]) -> list[Action]:
    return [a for a in plan if not (isinstance(a, Exchange) and a.is_empty)]


def one_f_one_b_plan(geometry: PipelineGeometry, forward_only: bool = False) -> list[Action]:
    """1F1B (PipeDream-Flush): each stage runs as many forwards as there are stages after it
    (warm-up), then alternates one forward with one backward (steady state), then finishes the
    outstanding backwards (cool-down). At most pp_size micro-batches' activations are alive."""
    g = geometry
    assert g.num_chunks == 1, g
    first, last, total = g.is_first_stage, g.is_last_stage, g.num_microbatches
    warmup = min(g.pp_size - g.pp_rank - 1, total)
    steady = total - warmup
    plan: list[Action] = []
    for k in range(warmup):
        plan += [Exchange(recv_prev=not first), Forward(k), Exchange(send_next=not last)]
    if steady:
        plan.append(Exchange(recv_prev=not first))
    for i in range(steady):
        more = i < steady - 1
        plan.append(Forward(warmup + i))
        if forward_only:
            plan += [Exchange(send_next=not last), Exchange(recv_prev=not first and more)]
            continue
        # Send this forward's output while receiving the gradient the oldest one is waiting for.
        plan += [Exchange(send_next=not last, recv_next=not last), Backward(i),
                 Exchange(send_prev=not first, recv_prev=not first and more)]
    if not forward_only:
        for i in range(steady, total):
            plan += [Exchange(recv_next=not last), Backward(i), Exchange(send_prev=not first)]
    return _drop_empty(plan)


def interleaved_plan(geometry: PipelineGeometry, forward_only: bool = False) -> list[Action]:
    """1F1B over virtual stages (Narayanan et al. 2021): each rank holds `num_chunks` model
    chunks, so the pipeline bubble shrinks by that factor for the price of more exchanges.

    Every stage makes one exchange per forward or backward; warm-up lengths differ by two per
    stage, which puts each exchange opposite the neighbour's matching one. Where a stage
    receives from the wrap-around link (last stage -> first stage, chunk c -> c + 1), whether
    the sender sends this time depends on the chunk it is working on pp_size - 1 steps behind."""
    g = geometry
    size, chunks, total = g.pp_size, g.num_chunks, g.num_steps
    first, last = g.is_first_stage, g.is_last_stage
    all_warmup = forward_only or g.num_microbatches == size
    warmup = total if all_warmup else min(total, (size - g.pp_rank - 1) * 2 + (chunks - 1) * size)
    steady = total - warmup
    plan: list[Action] = [Exchange(recv_prev=not first)]
    for k in range(warmup):
        recv_prev = k + 1 < total and not g.is_first_virtual(g.chunk(k + 1))
        # The last warm-up exchange also fetches the gradient the first backward needs.
        recv_next = k == warmup - 1 and steady > 0 and not last
        plan += [Forward(k), Exchange(send_next=not g.is_last_virtual(g.chunk(k)), recv_prev=recv_prev,
                                      recv_next=recv_next)]
    for j in range(steady):
        f, b = warmup + j, j
        recv_prev = j < steady - 1 and (g.chunk(f - (size - 1)) != chunks - 1 if first else True)
        recv_next = g.chunk(b - (size - 1), forward=False) != 0 if last else True
        plan += [Forward(f), Backward(b),
                 Exchange(send_next=not g.is_last_virtual(g.chunk(f)),
                          send_prev=not g.is_first_virtual(g.chunk(b, forward=False)),
                          recv_prev=recv_prev, recv_next=recv_next)]
    if forward_only:
        return _drop_empty(plan)
    if steady == 0:
        plan.append(Exchange(recv_next=not last))
    for b in range(steady, total):
        recv_next = b + 1 < total and not g.is_last_virtual(g.chunk(b + 1, forward=False))
        plan += [Backward(b), Exchange(send_prev=not g.is_first_virtual(g.chunk(b, forward=False)),
                                       recv_next=recv_next)]
    return _drop_empty(plan)


# ----- executor --------------------------------------------------------------------------------
def set_input_tensor(model: torch.nn.Module, tensor: torch.Tensor | None) -> None:
    """Calls `set_input_tensor` on `model` or on the module it wraps (DDP and the like)."""
    target = model
    while not hasattr(target, "set_input_tensor") and hasattr(target, "module"):
        target = target.module
    if not hasattr(target, "set_input_tensor"):
        raise ValueError(f"pipeline stages receive their input through model.set_input_tensor(tensor); "
                         f"{type(model).__name__} (and any module it wraps) has no such method")
    target.set_input_tensor(tensor)


def deallocate_output_tensor(output: torch.Tensor) -> None:
    """Free a sent activation's values, keeping the tensor (its autograd graph is needed until its
    backward): the next stage has its own copy, and backward needs only the graph and the output
    gradient, not the values (as Megatron's ``deallocate_output_tensor``). A view is left alone:
    its values belong to its base."""
    if output._base is None:
        output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def backward_from(output: torch.Tensor, output_grad: torch.Tensor) -> None:
    """`torch.autograd.backward(output, output_grad)` for an output whose values may have been
    freed by `deallocate_output_tensor`: the autograd engine is called directly, since the Python
    entry checks the gradient's shape against the (now one-element) tensor; the engine checks it
    against the shape the graph recorded."""
    if output.shape == output_grad.shape:
        torch.autograd.backward(output, grad_tensors=output_grad)
        return
    torch.autograd.Variable._execution_engine.run_backward(
        (output,), (output_grad,), False, False, (), True, True)


class _PlanRun:
    """The state of one stage while it runs a plan: tensors received but not yet used, outputs
    not yet sent, and what each in-flight micro-batch needs for its backward."""

    def __init__(self, geometry: PipelineGeometry, p2p: P2PCommunicator, chunks: Sequence[torch.nn.Module],
                 iterators: Sequence[Iterator], forward_step: ForwardStep, forward_only: bool):
        self.g, self.p2p, self.chunks, self.iterators = geometry, p2p, chunks, iterators
        self.forward_step, self.forward_only = forward_step, forward_only
        self.received_activations: deque[torch.Tensor] = deque()
        self.received_grads: deque[torch.Tensor] = deque()
        self.unsent_activations: deque[torch.Tensor] = deque()
        self.unsent_grads: deque[torch.Tensor] = deque()
        self.in_flight: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.reported: list[dict] = []

    def run(self, plan: list[Action]) -> list[dict]:
        for action in plan:
            if isinstance(action, Forward):
                self.forward(action.step)
            elif isinstance(action, Backward):
                self.backward(action.step)
            else:
                self.exchange(action)
        assert not (self.in_flight or self.received_activations or self.received_grads or self.unsent_activations
                    or self.unsent_grads), "a pipeline plan left tensors behind"
        return self.reported

    def forward(self, step: int) -> None:
        g = self.g
        chunk = g.chunk(step)
        input_tensor = None if g.is_first_virtual(chunk) else self.received_activations.popleft()
        model = self.chunks[chunk]
        set_input_tensor(model, input_tensor)
        with torch.set_grad_enabled(not self.forward_only):
            output, loss_fn = self.forward_step(self.iterators[chunk], model)
            if g.is_last_virtual(chunk):
                loss, values = loss_fn(output)
                self.reported.append(values)
                output = loss / g.num_microbatches
            else:
                self.unsent_activations.append(output)
        set_input_tensor(model, None)  # the stored tensor would keep this micro-batch's graph alive
        if not self.forward_only:
            self.in_flight[(chunk, g.microbatch(step))] = (input_tensor, output)

    def backward(self, step: int) -> None:
        g = self.g
        chunk = g.chunk(step, forward=False)
        input_tensor, output = self.in_flight.pop((chunk, g.microbatch(step)))
        if g.is_last_virtual(chunk):
            torch.autograd.backward(output)
        else:
            backward_from(output, self.received_grads.popleft())
        if not g.is_first_virtual(chunk):
            assert input_tensor.grad is not None, "a stage's output does not depend on its input"
            self.unsent_grads.append(input_tensor.grad)

    def exchange(self, action: Exchange) -> None:
        activation = self.unsent_activations.popleft() if action.send_next else None
        from_prev, from_next = self.p2p.exchange(
            send_next=activation,
            send_prev=self.unsent_grads.popleft() if action.send_prev else None,
            recv_prev=action.recv_prev, recv_next=action.recv_next, requires_grad=not self.forward_only)
        if activation is not None and not self.forward_only:
            deallocate_output_tensor(activation)
        if from_prev is not None:
            self.received_activations.append(from_prev)
        if from_next is not None:
            self.received_grads.append(from_next)


def forward_backward_pipelining_without_interleaving(
        *, forward_step: ForwardStep, data_iterator: Iterator, model: torch.nn.Module, num_microbatches: int,
        forward_only: bool = False, p2p: P2PCommunicator) -> list[dict]:
    """1F1B over this rank's stage. Returns the reported dicts on the last stage, [] elsewhere."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"got {len(model)} model chunks but no virtual pipeline; set "
                             f"--num-layers-per-virtual-pipeline-stage or pass one model")
        model = model[0]
    ps = p2p.ps
    geometry = PipelineGeometry(ps.pp_size, ps.pp_rank, num_microbatches)
    run = _PlanRun(geometry, p2p, [model], [data_iterator], forward_step, forward_only)
    return run.run(one_f_one_b_plan(geometry, forward_only))


def forward_backward_pipelining_with_interleaving(
        *, forward_step: ForwardStep, data_iterator: Iterator | Sequence[Iterator], model: Sequence[torch.nn.Module],
        num_microbatches: int, forward_only: bool = False, p2p: P2PCommunicator) -> list[dict]:
    """Interleaved 1F1B over this rank's model chunks (`model`: one module per virtual stage, in
    order). `data_iterator`: one per chunk, or one that every chunk then reads in turn (each
    chunk sees every micro-batch once, in order). Returns reported dicts on the last stage."""
    ps = p2p.ps
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(chunks) < 2:
        raise ValueError("the interleaved schedule needs a list of model chunks, one per virtual stage; "
                         "use the non-interleaved schedule for one chunk")
    if num_microbatches % ps.pp_size:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) to be a "
                         f"multiple of --pipeline-model-parallel-size ({ps.pp_size}); change --global-batch-size "
                         f"or --micro-batch-size")
    iterators = _chunk_iterators(data_iterator, len(chunks))
    geometry = PipelineGeometry(ps.pp_size, ps.pp_rank, num_microbatches, len(chunks))
    run = _PlanRun(geometry, p2p, chunks, iterators, forward_step, forward_only)
    return run.run(interleaved_plan(geometry, forward_only))


def _chunk_iterators(data_iterator, num_chunks: int) -> list[Iterator]:
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != num_chunks:
            raise ValueError(f"got {len(data_iterator)} data iterators for {num_chunks} model chunks; pass one "
                             f"per chunk or a single iterator")
        return list(data_iterator)
    # Every chunk reads each micro-batch once; at the end of a global batch all copies have read
    # the same number, so nothing stays buffered and the source has advanced by exactly that.
    return list(itertools.tee(data_iterator, num_chunks))


def get_forward_backward_func(ps: ParallelState, virtual_pipeline_size: int | None = None, *,
                              tensor_shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                              fp8_p2p: bool = False):
    """The schedule for this layout, called as ``fn(forward_step=, data_iterator=, model=,
    num_microbatches=, forward_only=False) -> list[dict]`` whatever the layout.

    With pipelining, `tensor_shape` is the activation every stage sends (see
    `p2p_communication.activation_shape`) and `dtype` the model's activation dtype; both are
    fixed for the run. `virtual_pipeline_size` > 1 selects the interleaved schedule, whose
    `model` is then the list of this rank's model chunks."""
    interleaved = virtual_pipeline_size is not None and virtual_pipeline_size > 1
    if ps.pp_size == 1:
        if interleaved:
            raise ValueError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1; "
                             "drop it or raise the pipeline size")
        return forward_backward_no_pipelining
    if tensor_shape is None:
        raise ValueError("pipeline schedules need tensor_shape = [seq_length (/ tp with --sequence-parallel), "
                         "micro_batch_size, hidden_size]; see p2p_communication.activation_shape")
    p2p = P2PCommunicator(ps, tensor_shape, dtype, fp8=fp8_p2p)
    schedule = (forward_backward_pipelining_with_interleaving if interleaved
                else forward_backward_pipelining_without_interleaving)
    return partial(schedule, p2p=p2p)


def reported_mean(reported: list[dict], key: str, ps: ParallelState) -> float:
    """The mean of ``reported[i][key]`` over micro-batches and data-parallel ranks, on every rank.

    Under pipelining only the last stage has `reported`; it broadcasts its mean to the other
    stages of its pipeline first, so every rank logs (and can act on) the same number."""
    return _reported_total(reported, key, ps, mean=True)


def reported_mean_tensor(reported: list[dict], key: str, ps: ParallelState) -> torch.Tensor:
    """`reported_mean` left on the device (0-dim), for a caller that reads it with other values."""
    return _reported_total(reported, key, ps, mean=True, read=False)


def reported_sum(reported: list[dict], key: str, ps: ParallelState) -> float:
    """The sum of ``reported[i][key]`` over micro-batches and data-parallel ranks (a count over the
    global batch, e.g. of response tokens), on every rank, as `reported_mean` gathers it."""
    return _reported_total(reported, key, ps, mean=False)


def _reported_total(reported: list[dict], key: str, ps: ParallelState, mean: bool, read: bool = True):
    if reported:
        values = torch.stack([torch.as_tensor(v[key], dtype=torch.float32) for v in reported])
        local = (values.mean() if mean else values.sum()).to(ps.device)
    else:
        assert not ps.is_last_stage, f"the last pipeline stage reported no {key!r}"
        local = torch.zeros((), dtype=torch.float32, device=ps.device)
    if ps.pp_size > 1:
        comm.broadcast(local.reshape(1), ps, "pp", src_group_rank=ps.pp_size - 1)
    if ps.dp_size > 1:
        comm.all_reduce(local, ps, "dp")
        if mean:
            local.div_(ps.dp_size)
    return local.item() if read else local
