"""RNG streams: dropout matches across tensor-parallel ranks on the default stream, differs on the
model-parallel stream; fork leaves the default stream untouched; states round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import MODEL_PARALLEL_RNG, RNGStatesTracker, model_parallel_seed


def _fake_ps(tp_rank: int = 0, pp_rank: int = 0, tp_size: int = 2, pp_size: int = 2) -> ParallelState:
    """Seeding reads only coordinates, so no process groups are needed."""
    return ParallelState(world_size=tp_size * pp_size, rank=pp_rank * tp_size + tp_rank, tp_size=tp_size,
                         pp_size=pp_size, dp_size=1, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=0,
                         device=torch.device("cpu"), backend=None)


def _draws(ps: ParallelState, seed: int = 1234):
    """(default-stream draw, model-parallel draw, default draw after the fork)."""
    tracker = model_parallel_seed(ps, seed)
    first = torch.rand(4)
    with tracker.fork():
        inside = torch.rand(4)
    return first, inside, torch.rand(4)


def test_fork_leaves_default_stream_untouched():
    tracker = RNGStatesTracker("cpu")
    torch.manual_seed(5)
    tracker.add("stream", 77)
    expected = torch.rand(6)
    torch.manual_seed(5)
    tracker.add("other", 78)  # adding does not consume from the default stream either
    with tracker.fork("stream"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(6), expected)
    torch.manual_seed(77)
    assert torch.equal(inside, torch.rand(3))


def test_fork_advances_its_stream_and_states_round_trip():
    tracker = RNGStatesTracker("cpu")
    tracker.add("dropout", 11)
    saved = tracker.get_states()
    with tracker.fork("dropout"):
        first = torch.rand(5)
    with tracker.fork("dropout"):
        second = torch.rand(5)
    assert not torch.equal(first, second)
    tracker.set_states(saved)
    with tracker.fork("dropout"):
        assert torch.equal(torch.rand(5), first)
    restored = RNGStatesTracker("cpu")
    restored.set_states(tracker.get_states())
    with restored.fork("dropout"):
        assert torch.equal(torch.rand(5), second)


def test_tracker_mistakes():
    tracker = RNGStatesTracker("cpu")
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="was never added"):
        with tracker.fork("missing"):
            pass
    tracker.reset()
    tracker.add("a", 1)
    assert tracker.names == ["a"]
    with pytest.raises(ValueError, match="non-negative integer"):
        model_parallel_seed(_fake_ps(), -1)


def test_megatron_seeding_rule():
    stage0_tp0, stage0_tp1, stage1_tp0 = (_draws(_fake_ps(0, 0)), _draws(_fake_ps(1, 0)), _draws(_fake_ps(0, 1)))
    assert torch.equal(stage0_tp0[0], stage0_tp1[0]) and torch.equal(stage0_tp0[2], stage0_tp1[2])
    assert not torch.equal(stage0_tp0[1], stage0_tp1[1])
    assert not torch.equal(stage0_tp0[0], stage1_tp0[0])
    torch.manual_seed(1234 + 100)
    assert torch.equal(stage1_tp0[0], torch.rand(4))
    torch.manual_seed(1234 + 2718 + 1)
    assert torch.equal(stage0_tp1[1], torch.rand(4))
    assert model_parallel_seed(_fake_ps(), 1).names == [MODEL_PARALLEL_RNG]


def _dropout_worker(rank, world_size):
    ps = ParallelState.build(tensor_model_parallel_size=2)  # tp pairs (0, 1) and (2, 3)
    tracker = model_parallel_seed(ps, 42)
    ones = torch.ones(64)
    replicated_mask = F.dropout(ones, p=0.5)
    with tracker.fork():
        sharded_mask = F.dropout(ones, p=0.5)
    return replicated_mask, sharded_mask, F.dropout(ones, p=0.5)


@pytest.mark.distributed
def test_dropout_masks_across_ranks():
    masks = run_distributed(_dropout_worker, 4)
    for rank in range(4):
        # The default stream is shared by every rank (tp and dp); the model-parallel one by tp rank only.
        assert torch.equal(masks[rank][0], masks[0][0]) and torch.equal(masks[rank][2], masks[0][2])
        assert torch.equal(masks[rank][1], masks[rank % 2][1])
    assert not torch.equal(masks[0][1], masks[1][1])
    assert not torch.equal(masks[0][0], masks[0][2])
