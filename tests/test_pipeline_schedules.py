"""Pipeline plans, model split and tied-embedding bookkeeping, without processes.

The plans of all stages are played against each other under NCCL's rendezvous rule (an exchange
finishes only when the peer has posted every matching operation, and messages on a link pair up
in posting order), so a deadlock, a receive nobody sends, or an activation that meets a gradient
receive on a shared link (two stages) fails here in milliseconds."""

import dataclasses
from collections import defaultdict, deque

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.layout import layouts_of
from megatron.core.parallelize import global_name, initialize_parameters, parallelize_gpt
from megatron.core.pipeline_parallel import schedules
from megatron.core.pipeline_parallel.model import (
    build_gpt_stage, build_gpt_stages, count_parameters, shared_embedding_params, stage_layers, virtual_pipeline_size,
)
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator, activation_shape
from megatron.core.pipeline_parallel.schedules import (
    Backward, Exchange, Forward, PipelineGeometry, get_forward_backward_func, interleaved_plan, one_f_one_b_plan,
)
from megatron.core.transformer.config import TransformerConfig


class ScheduleError(AssertionError):
    pass


class _Stage:
    def __init__(self, geometry, plan):
        self.g, self.plan, self.position, self.posted = geometry, plan, 0, None
        self.inbox = {"act": deque(), "grad": deque()}
        self.outbox = {"act": deque(), "grad": deque()}
        self.done = {"F": set(), "B": set()}


def _expected_source(g: PipelineGeometry, kind: str, chunk: int, micro: int) -> tuple:
    """Who must have produced the tensor this (chunk, micro-batch) consumes."""
    r, last = g.pp_rank, g.pp_size - 1
    if kind == "act":
        return ("act", r - 1, chunk, micro) if r > 0 else ("act", last, chunk - 1, micro)
    return ("grad", r + 1, chunk, micro) if r < last else ("grad", 0, chunk + 1, micro)


def _compute(stage: _Stage, action) -> None:
    g = stage.g
    forward = isinstance(action, Forward)
    chunk, micro = g.chunk(action.step, forward=forward), g.microbatch(action.step)
    kind, needs_input, makes_output = (("act", not g.is_first_virtual(chunk), not g.is_last_virtual(chunk)) if forward
                                       else ("grad", not g.is_last_virtual(chunk), not g.is_first_virtual(chunk)))
    if not forward and (chunk, micro) not in stage.done["F"]:
        raise ScheduleError(f"stage {g.pp_rank}: backward of {(chunk, micro)} before its forward")
    if needs_input:
        if not stage.inbox[kind]:
            raise ScheduleError(f"stage {g.pp_rank}: {action} runs before its input arrived")
        got, want = stage.inbox[kind].popleft(), _expected_source(g, kind, chunk, micro)
        if got != want:
            raise ScheduleError(f"stage {g.pp_rank}: {action} got {got}, wanted {want}")
    if makes_output:
        stage.outbox[kind].append((kind, g.pp_rank, chunk, micro))
    stage.done["F" if forward else "B"].add((chunk, micro))


def _post(stage: _Stage, action: Exchange, sends, recvs) -> None:
    r, size = stage.g.pp_rank, stage.g.pp_size
    ops = []
    for wanted, kind, peer in ((action.send_next, "act", (r + 1) % size), (action.send_prev, "grad", (r - 1) % size)):
        if wanted:
            if not stage.outbox[kind]:
                raise ScheduleError(f"stage {r} sends an {kind} it has not produced")
            sends[(r, peer)].append(stage.outbox[kind].popleft())
            ops.append(((r, peer), len(sends[(r, peer)]) - 1, None))
    for wanted, kind, peer in ((action.recv_prev, "act", (r - 1) % size), (action.recv_next, "grad", (r + 1) % size)):
        if wanted:
            recvs[(peer, r)].append(kind)
            ops.append(((peer, r), len(recvs[(peer, r)]) - 1, kind))
    stage.posted = ops


def _advance(stage: _Stage, sends, recvs) -> bool:
    if stage.position == len(stage.plan):
        return False
    action = stage.plan[stage.position]
    if isinstance(action, Exchange):
        if stage.posted is None:
            _post(stage, action, sends, recvs)
        if not all(len(sends[link]) > i and len(recvs[link]) > i for link, i, _ in stage.posted):
            return False
        for link, i, kind in stage.posted:
            if kind is not None:
                if sends[link][i][0] != kind:
                    raise ScheduleError(f"stage {stage.g.pp_rank}: an {kind} receive met {sends[link][i]}")
                stage.inbox[kind].append(sends[link][i])
        stage.posted = None
    else:
        _compute(stage, action)
    stage.position += 1
    return True


def simulate(pp_size: int, num_chunks: int, num_microbatches: int, forward_only: bool = False, build=None) -> int:
    """Plays every stage's plan; returns the number of messages. Raises ScheduleError."""
    build = build or (interleaved_plan if num_chunks > 1 else one_f_one_b_plan)
    stages = [_Stage(g, build(g, forward_only)) for g in
              (PipelineGeometry(pp_size, r, num_microbatches, num_chunks) for r in range(pp_size))]
    sends, recvs = defaultdict(list), defaultdict(list)
    while any([_advance(stage, sends, recvs) for stage in stages]):
        pass
    stuck = {s.g.pp_rank: s.plan[s.position] for s in stages if s.position < len(s.plan)}
    if stuck:
        raise ScheduleError(f"deadlock: {stuck}")
    assert all(len(sends[link]) == len(recvs[link]) for link in sends.keys() | recvs.keys())
    steps = num_microbatches * num_chunks
    for stage in stages:
        assert len(stage.done["F"]) == steps and len(stage.done["B"]) == (0 if forward_only else steps)
    return sum(len(v) for v in sends.values())


@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("pp_size", [2, 3, 4, 5])
def test_one_f_one_b_plans_pair_up(pp_size, forward_only):
    for num_microbatches in range(1, 11):
        messages = simulate(pp_size, 1, num_microbatches, forward_only)
        assert messages == (pp_size - 1) * num_microbatches * (1 if forward_only else 2)


@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("pp_size", [2, 3, 4])
def test_interleaved_plans_pair_up(pp_size, forward_only):
    for num_chunks in (2, 3, 4):
        for num_microbatches in (pp_size, 2 * pp_size, 3 * pp_size):
            messages = simulate(pp_size, num_chunks, num_microbatches, forward_only)
            per_direction = (pp_size * num_chunks - 1) * num_microbatches
            assert messages == per_direction * (1 if forward_only else 2)


def test_one_f_one_b_keeps_at_most_pp_size_microbatches_in_flight():
    for rank in range(4):
        plan = one_f_one_b_plan(PipelineGeometry(4, rank, 10))
        alive = peak = 0
        for action in plan:
            alive += isinstance(action, Forward) - isinstance(action, Backward)
            peak = max(peak, alive)
        assert peak == 4 - rank


@pytest.mark.parametrize("field", ["send_next", "send_prev", "recv_prev", "recv_next"])
def test_simulator_catches_a_broken_plan(field):
    """The check above is only as good as the simulator: any one flipped flag must be caught."""
    def broken(geometry, forward_only=False):
        plan = interleaved_plan(geometry, forward_only)
        if geometry.pp_rank != 1:
            return plan
        index = [i for i, a in enumerate(plan) if isinstance(a, Exchange)][len(plan) // 4]
        plan[index] = dataclasses.replace(plan[index], **{field: not getattr(plan[index], field)})
        return plan
    with pytest.raises((ScheduleError, IndexError, AssertionError)):
        simulate(3, 2, 6, build=broken)


def test_geometry_orders_chunks_in_groups_of_pp_size():
    g = PipelineGeometry(pp_size=2, pp_rank=0, num_microbatches=4, num_chunks=2)
    assert [(g.chunk(k), g.microbatch(k)) for k in range(8)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert [g.chunk(k, forward=False) for k in range(4)] == [1, 1, 0, 0]


# ----- model split -----------------------------------------------------------------------------
def tiny_config(**overrides):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=8,
                hidden_dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**base, **overrides})


def fake_ps(pp_size: int, pp_rank: int) -> ParallelState:
    """Enough of a ParallelState to build stages on one process (no collectives are made)."""
    return ParallelState(world_size=pp_size, rank=pp_rank, tp_size=1, pp_size=pp_size, dp_size=1, tp_rank=0,
                         pp_rank=pp_rank, dp_rank=0, device=torch.device("cpu"), backend=None,
                         pp_ranks=tuple(range(pp_size)))


def test_stage_layers_split_evenly_and_interleave():
    assert [stage_layers(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [stage_layers(8, 2, r, virtual_stage=c, num_layers_per_virtual_stage=2)
            for r in range(2) for c in range(2)] == [(0, 2), (4, 2), (2, 2), (6, 2)]
    assert virtual_pipeline_size(8, 2, None) is None and virtual_pipeline_size(8, 2, 1) == 4


@pytest.mark.parametrize("args, flag", [((6, 4, None), "--num-layers"), ((8, 2, 3), "virtual-pipeline-stage"),
                                        ((8, 1, 2), "--pipeline-model-parallel-size > 1")])
def test_layer_split_errors_name_the_flags(args, flag):
    with pytest.raises(ValueError, match=flag):
        virtual_pipeline_size(*args)


def test_stages_hold_embedding_first_and_head_last():
    config = tiny_config()
    stages = [build_gpt_stage(config, fake_ps(2, r)) for r in range(2)]
    assert stages[0].embedding is not None and stages[0].output_layer is None
    assert stages[1].embedding is None and stages[1].output_layer is not None
    assert [layer.layer_number for s in stages for layer in s.decoder.layers] == [0, 1, 2, 3]
    chunks = build_gpt_stages(config, fake_ps(2, 1), num_layers_per_virtual_stage=1)
    assert [c.decoder.first_layer for c in chunks] == [1, 3]
    assert [c.post_process for c in chunks] == [False, True] and not any(c.pre_process for c in chunks)


def build_initialised(config, ps):
    model = build_gpt_stage(config, ps, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=7, device="cpu")
    return model


@pytest.mark.parametrize("untie", [False, True])
def test_tied_output_weight_starts_as_the_embedding_copy(untie):
    config = tiny_config(untie_embeddings_and_output_weights=untie)
    first, last = (build_initialised(config, fake_ps(2, r)) for r in range(2))
    embedding, output = first.embedding.word_embeddings.weight, last.output_layer.weight
    assert torch.equal(embedding, output) != untie
    assert global_name(last, "output_layer.weight") == ("output_layer.weight" if untie
                                                        else "embedding.word_embeddings.weight")
    assert layouts_of(last)[output].tied_duplicate != untie
    assert not layouts_of(first)[embedding].tied_duplicate
    assert len(shared_embedding_params(first)) == len(shared_embedding_params(last)) == (0 if untie else 1)
    whole = GPTModel(config, device="meta")
    parallelize_gpt(whole, ParallelState.single())
    assert not shared_embedding_params(whole)  # one process: the head uses the embedding itself
    assert count_parameters(first) + count_parameters(last) == config.num_parameters()


def test_set_input_tensor_feeds_a_stage_without_embedding():
    config = tiny_config()
    last = build_initialised(config, fake_ps(2, 1))
    hidden = torch.randn(8, 2, config.hidden_size)
    labels = torch.randint(0, config.vocab_size, (2, 8))
    last.set_input_tensor(hidden)
    torch.testing.assert_close(last(None, labels), last(None, labels, hidden_states=hidden), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set_input_tensor"):
        schedules.set_input_tensor(torch.nn.Linear(2, 2), hidden)
    wrapper = torch.nn.Module()
    wrapper.module = last
    schedules.set_input_tensor(wrapper, None)
    assert last.input_tensor is None


# ----- schedule selection and shapes -----------------------------------------------------------
def test_schedule_selection_and_errors():
    single = ParallelState.single()
    assert get_forward_backward_func(single) is schedules.forward_backward_no_pipelining
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size > 1"):
        get_forward_backward_func(single, virtual_pipeline_size=2)
    ps = fake_ps(2, 0)
    with pytest.raises(ValueError, match="tensor_shape"):
        get_forward_backward_func(ps)
    one_f_one_b = get_forward_backward_func(ps, tensor_shape=(8, 2, 32))
    interleaved = get_forward_backward_func(ps, 2, tensor_shape=(8, 2, 32))
    assert one_f_one_b.func is schedules.forward_backward_pipelining_without_interleaving
    assert interleaved.func is schedules.forward_backward_pipelining_with_interleaving
    with pytest.raises(ValueError, match="multiple of --pipeline-model-parallel-size"):
        interleaved(forward_step=None, data_iterator=iter([]), model=[torch.nn.Linear(1, 1)] * 2, num_microbatches=3)


def test_activation_shape_and_send_check():
    assert activation_shape(16, 2, 64) == (16, 2, 64)
    assert activation_shape(16, 2, 64, tp_size=4, sequence_parallel=True) == (4, 2, 64)
    assert activation_shape(16, 2, 64, tp_size=4) == (16, 2, 64)
    with pytest.raises(ValueError, match="--seq-length"):
        activation_shape(10, 2, 64, tp_size=4, sequence_parallel=True)
    p2p = P2PCommunicator(fake_ps(2, 0), (16, 2, 64), torch.bfloat16)
    assert p2p.message_nbytes == 16 * 2 * 64 * 2
    with pytest.raises(ValueError, match=r"set up for \(16, 2, 64\)"):
        p2p.send_forward(torch.zeros(16, 2, 64))  # float32, not the agreed bfloat16
