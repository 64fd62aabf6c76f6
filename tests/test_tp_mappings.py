"""Tensor/sequence-parallel autograd mappings: forward and backward on real gloo ranks against
what a single process computes from every rank's data."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import mappings

SHAPE = (8, 2, 8)  # [sequence, batch, hidden], divisible by tp = 2 and 4


def _full(salt: int, rank: int = 0) -> torch.Tensor:
    """A full-size tensor; `rank` distinguishes the per-rank partial sums and gradients."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 * salt + rank), dtype=torch.float64)


def _chunk(x: torch.Tensor, rank: int, tp: int, dim: int) -> torch.Tensor:
    return x.chunk(tp, dim=dim)[rank]


# Each case: mapping, this rank's input, the upstream gradient of this rank's output, and the
# single-process reference for (output, input gradient). X = input data, G = upstream gradient;
# "partial" means each rank holds a different addend, whose sum over ranks is the true value.
def _cases(rank: int, tp: int):
    X, G = _full(1), _full(2)
    X_r, G_r = _full(1, rank + 1), _full(2, rank + 1)
    sum_X = sum(_full(1, r + 1) for r in range(tp))
    sum_G = sum(_full(2, r + 1) for r in range(tp))
    seq = lambda t: _chunk(t, rank, tp, 0)  # noqa: E731
    hid = lambda t: _chunk(t, rank, tp, -1)  # noqa: E731
    return {
        "copy_to_tp": (mappings.copy_to_tensor_model_parallel_region, X, G_r, X, sum_G),
        "reduce_from_tp": (mappings.reduce_from_tensor_model_parallel_region, X_r, G, sum_X, G),
        "scatter_to_tp": (mappings.scatter_to_tensor_model_parallel_region, X, hid(G), hid(X), G),
        "gather_from_tp": (mappings.gather_from_tensor_model_parallel_region, hid(X), G, X, hid(G)),
        "scatter_to_sp": (mappings.scatter_to_sequence_parallel_region, X, seq(G), seq(X), G),
        "gather_from_sp": (mappings.gather_from_sequence_parallel_region, seq(X), G_r, X, seq(sum_G)),
        "gather_from_sp_replicated": (
            lambda x, ps: mappings.gather_from_sequence_parallel_region(x, ps, tensor_parallel_output_grad=False),
            seq(X), G, X, seq(G)),
        "reduce_scatter_to_sp": (mappings.reduce_scatter_to_sequence_parallel_region, X_r, seq(G), seq(sum_X), G),
    }


def _run_case(mapping, x, upstream_grad, ps):
    x = x.clone().requires_grad_()
    before = ps.counter.snapshot()
    out = mapping(x, ps)
    out.backward(upstream_grad)
    return out.detach(), x.grad, ps.counter.since(before)["tp_bytes"]


def _mappings_worker(rank, world_size, names):
    ps = ParallelState.build(tensor_model_parallel_size=world_size)
    cases = _cases(rank, world_size)
    return {name: _run_case(*cases[name][:3], ps) for name in names}


def _check(per_rank: list, tp: int):
    for rank, results in enumerate(per_rank):
        cases = _cases(rank, tp)
        for name, (out, grad, _) in results.items():
            *_, expected_out, expected_grad = cases[name]
            torch.testing.assert_close(out, expected_out, msg=f"{name} forward on rank {rank}")
            torch.testing.assert_close(grad, expected_grad, msg=f"{name} backward on rank {rank}")


@pytest.mark.distributed
def test_every_mapping_at_tp2():
    names = list(_cases(0, 2))
    per_rank = run_distributed(_mappings_worker, 2, names)
    _check(per_rank, 2)
    full_bytes = torch.zeros(SHAPE, dtype=torch.float64).nbytes
    for results in per_rank:
        # One collective each way (or one only): all-reduce 2 * 1/2 * S, gather / reduce-scatter 1/2 * S.
        assert results["copy_to_tp"][2] == full_bytes
        assert results["scatter_to_tp"][2] == full_bytes // 2
        assert results["gather_from_sp"][2] == full_bytes // 2 + full_bytes // 2
        assert results["gather_from_sp_replicated"][2] == full_bytes // 2


@pytest.mark.distributed
def test_sequence_parallel_mappings_at_tp4():
    names = ["gather_from_sp", "reduce_scatter_to_sp", "scatter_to_sp", "gather_from_tp", "reduce_from_tp"]
    _check(run_distributed(_mappings_worker, 4, names), 4)


def test_tp1_mappings_are_identities():
    ps = ParallelState.single("cpu")
    x = torch.randn(4, 2, 6, requires_grad=True)
    for name, (mapping, *_rest) in _cases(0, 1).items():
        assert mapping(x, ps) is x, name


def test_indivisible_sequence_names_the_fix():
    ps = ParallelState(world_size=2, rank=0, tp_size=2, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0,
                       dp_rank=0, device=torch.device("cpu"), backend=None, tp_ranks=(0, 1))
    with pytest.raises(ValueError, match="sequence length of size 7 is not divisible by tensor-parallel size 2"):
        mappings.scatter_to_sequence_parallel_region(torch.zeros(7, 1, 4), ps)
