"""The memory figures of the metrics file against an independent measure: a walk of the tensors
that the model, the data-parallel wrapper and the optimizer actually reference, each storage
counted once at its real size. Run after two training steps, between steps (what `memory`
reports), at every level, at DP 1 and under FP8 ZeRO at DP 2."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from fp8.linear import FP8LinearState
from megatron.core.parallel_state import ParallelState
from megatron.training.training import memory_record
from test_fp8_level_o3 import build, train

LEVELS = [("none", False), ("none", True), ("O0", False), ("O1", False), ("O2", False), ("O2", True), ("O3", True)]


def _tensors_in(obj, seen: set[int], out: list[torch.Tensor]) -> None:
    """Every tensor reachable from `obj` through attributes, slots and containers."""
    if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool, torch.dtype, torch.device)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        children = list(vars(obj).values()) if hasattr(obj, "__dict__") else []  # a parameter's `.scale`
    elif isinstance(obj, dict):
        children = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, torch.nn.Module):
        children = [p for p in obj.parameters(recurse=False)] + list(vars(obj).values())
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        children += [getattr(obj, name) for name in getattr(type(obj), "__slots__", ()) if hasattr(obj, name)]
    for child in children:
        _tensors_in(child, seen, out)


def storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage behind `tensors`."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def walk(model, ddp, optimizer) -> dict[str, int]:
    weights = []
    for param in model.parameters():
        weights.append(param)
        if isinstance(getattr(param, "scale", None), torch.Tensor):
            weights.append(param.scale)
    for module in model.modules():  # FP8 linears keep no FP8 weight copy between uses
        state = getattr(module, "fp8", None)
        if isinstance(state, FP8LinearState):
            kept = []
            _tensors_in({k: v for k, v in vars(state).items() if k != "grads"}, set(), kept)  # the store: grads
            assert all(t.numel() <= state.recipe.amax_history_len for t in kept), [t.shape for t in kept]
    grads = [ddp.grad_buffer.data]
    for param in model.parameters():
        assert param.grad is None  # gradients live in the buffer or as FP8 tensors only
        grad_fp8 = ddp.fp8_grads.get(param) if ddp.fp8_grads is not None else None
        if grad_fp8 is not None:
            grads += [grad_fp8.data, grad_fp8.scale]
    weight_storages, grad_storages = storages(weights), storages(grads)
    reached: list[torch.Tensor] = []
    _tensors_in(optimizer, set(), reached)
    optimizer_storages = {ptr: n for ptr, n in storages(reached).items()
                          if ptr not in weight_storages and ptr not in grad_storages}
    scalars = sum(1 for t in reached if t.numel() == 1)
    return {"weight": sum(weight_storages.values()), "grad": sum(grad_storages.values()),
            "optimizer": sum(optimizer_storages.values()), "scalars": scalars}


def accounting_worker(rank, world_size, levels):
    ps = ParallelState.build(1, 1)
    out = {}
    for level, zero in levels:
        model, ddp, optimizer = build(ps, level, dtype=torch.bfloat16 if level in ("none", "O0") else torch.float32,
                                      zero=zero)
        train(ps, model, ddp, optimizer, steps=2)
        out[level, zero] = (memory_record(model, ddp, optimizer, sum(p.numel() for p in model.parameters())),
                            walk(model, ddp, optimizer), ddp.grad_buffer.nbytes)
    return out


def check(results, dp: int) -> None:
    for (level, zero), (record, walked, _) in results.items():
        where = (level, zero, dp)
        assert record["weight_bytes"] == walked["weight"], where
        # The FP8 all-reduce's received bytes are padded to a multiple of DP: fewer than DP extra.
        assert 0 <= walked["grad"] - record["grad_bytes"] < dp, where
        held = record["master_bytes"] + record["optim_bytes"]
        # Beyond the counted states, the walk finds only scalars (Adam's step counters).
        assert 0 <= walked["optimizer"] - held <= 8 * walked["scalars"], where


def test_memory_record_matches_the_tensors_held_at_dp1():
    check(accounting_worker(0, 1, LEVELS), 1)


@pytest.mark.distributed
def test_memory_record_matches_the_tensors_held_under_fp8_zero_at_dp2():
    results = run_distributed(accounting_worker, 2, [("O2", True), ("O3", True)])
    for rank_results in results:
        check(rank_results, 2)
    o3 = [r["O3", True] for r in results]
    # Only owners keep an FP8 gradient after the reduction (each tensor on one rank); at the end
    # of backward every rank held all of them.
    peak = o3[0][0]["fp8_grad_peak_bytes"]
    owned = [record["grad_bytes"] - dense for record, _, dense in o3]
    assert o3[1][0]["fp8_grad_peak_bytes"] == peak and sum(owned) == peak and min(owned) > 0
