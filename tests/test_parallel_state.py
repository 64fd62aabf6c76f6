"""ParallelState: Megatron's rank layout, validation, and real groups on gloo processes."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState, check_sizes, group_layout, init_distributed


# ----- pure layout -----------------------------------------------------------------------------
def test_layout_world8_tp2_pp2():
    layout = group_layout(8, tp_size=2, pp_size=2)
    assert layout.tp == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert layout.dp == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert layout.pp == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert layout.embedding == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_layout_matches_megatron_docstring_world16_tp2_pp4():
    # The example in Megatron's initialize_model_parallel docstring.
    layout = group_layout(16, tp_size=2, pp_size=4)
    assert layout.tp == tuple((r, r + 1) for r in range(0, 16, 2))
    assert layout.dp == ((0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 14), (13, 15))
    assert layout.pp == ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15))
    assert layout.embedding == ((0, 12), (1, 13), (2, 14), (3, 15))


def test_layout_without_pipeline_has_no_embedding_group():
    layout = group_layout(4, tp_size=1, pp_size=1)
    assert layout.tp == ((0,), (1,), (2,), (3,))
    assert layout.dp == ((0, 1, 2, 3),)
    assert layout.embedding == ()
    assert layout.containing("dp", 2) == (0, 1, 2, 3)


def test_every_rank_is_in_exactly_one_group_of_each_kind():
    layout = group_layout(24, tp_size=2, pp_size=3)
    for name in ("tp", "dp", "pp"):
        members = sorted(r for ranks in getattr(layout, name) for r in ranks)
        assert members == list(range(24)), name


def test_validation_names_the_fix():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tensor-parallel size 4 x "
                                         "pipeline-parallel size 1; launch a multiple of 4 processes"):
        check_sizes(6, 4, 1)
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        check_sizes(4, 0, 1)
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size"):
        check_sizes(4, 1, 2.0)


def test_build_without_distributed():
    ps = ParallelState.build(1, 1)
    assert (ps.world_size, ps.tp_size, ps.dp_size, ps.pp_size) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="launch a multiple of 2 processes"):
        ParallelState.build(tensor_model_parallel_size=2)


def test_single_process_state():
    ps = ParallelState.single("cpu")
    assert ps.device == torch.device("cpu") and ps.backend is None
    assert ps.group("tp") is None and ps.group_size("dp") == 1 and ps.group_size("embedding") == 1
    assert ps.is_first_stage and ps.is_last_stage and ps.next_rank == ps.prev_rank == 0
    assert ps.ranks("pp") == (0,) and ps.group_rank("tp") == 0
    with pytest.raises(ValueError, match="unknown process group 'mp'"):
        ps.group("mp")


def test_init_distributed_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.is_distributed) == (0, 1, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        init_distributed()


# ----- real process groups ---------------------------------------------------------------------
def _describe_groups(ps: ParallelState) -> dict:
    """Each group's members as seen through a real all-gather over it."""
    seen = {}
    for name in ("tp", "dp", "pp", "embedding"):
        mine = torch.tensor([ps.rank])
        seen[name] = tuple(comm.all_gather(mine, ps, name).tolist()) if ps.group_size(name) > 1 else ps.ranks(name)
    return seen


def _layouts_worker(rank, world_size):
    results = {}
    for tp_size, pp_size in ((2, 2), (4, 1), (1, 2)):
        ps = ParallelState.build(tp_size, pp_size)
        results[(tp_size, pp_size)] = {
            "coords": (ps.tp_rank, ps.dp_rank, ps.pp_rank), "sizes": (ps.tp_size, ps.dp_size, ps.pp_size),
            "groups": _describe_groups(ps), "neighbours": (ps.prev_rank, ps.next_rank),
            "stage": (ps.is_first_stage, ps.is_last_stage), "backend": ps.backend, "device": str(ps.device)}
    try:
        ParallelState.build(3, 1)
    except ValueError as error:
        results["error"] = str(error)
    return results


@pytest.mark.distributed
def test_build_creates_megatron_groups_on_four_processes():
    per_rank = run_distributed(_layouts_worker, 4)
    for rank, results in enumerate(per_rank):
        assert results[(2, 2)]["coords"] == (rank % 2, 0, rank // 2)
        assert results[(2, 2)]["sizes"] == (2, 1, 2)
        assert results[(2, 2)]["groups"] == {
            "tp": (rank - rank % 2, rank - rank % 2 + 1), "dp": (rank,),
            "pp": (rank % 2, rank % 2 + 2), "embedding": (rank % 2, rank % 2 + 2)}
        assert results[(2, 2)]["neighbours"] == ((rank + 2) % 4,) * 2
        assert results[(2, 2)]["stage"] == (rank < 2, rank >= 2)
        assert results[(4, 1)]["groups"] == {"tp": (0, 1, 2, 3), "dp": (rank,), "pp": (rank,), "embedding": (rank,)}
        assert results[(1, 2)]["coords"] == (0, rank % 2, rank // 2)
        assert results[(1, 2)]["groups"]["dp"] == (rank - rank % 2, rank - rank % 2 + 1)
        assert results[(1, 2)]["backend"] == "gloo" and results[(1, 2)]["device"] == "cpu"
        assert "world size 4 is not divisible by tensor-parallel size 3" in results["error"]


def _init_worker(rank, world_size):
    env = init_distributed(timeout_s=60)
    ps = ParallelState.build(tensor_model_parallel_size=2)
    total = comm.all_reduce(torch.tensor([rank + 1.0]), ps, "tp")
    return env.rank, env.world_size, env.backend, str(env.device), total.item()


@pytest.mark.distributed
def test_init_distributed_from_torchrun_environment():
    results = run_distributed(_init_worker, 2, init_process_group=False)
    assert results == [(0, 2, "gloo", "cpu", 3.0), (1, 2, "gloo", "cpu", 3.0)]
