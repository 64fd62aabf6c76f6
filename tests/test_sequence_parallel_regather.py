"""The high-precision sequence-parallel column linear (level none) on two gloo ranks: it keeps
only its local input chunk for backward and gathers it again there, as Megatron-LM does; its
output and gradients are those of a single process, and the same bits as gathering first and
calling `F.linear`; weight gradients reach `param.grad` (and its hooks); tp bytes.

All distributed checks run in one start of two processes (the `results` fixture)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, load_full_weights

pytestmark = pytest.mark.distributed

TP, SEQ, BATCH, HIDDEN, OUT = 2, 8, 2, 16, 24


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_data(dtype) -> dict:
    """Full input [s, b, h], weight, bias and the output gradient of the whole (unsharded) layer."""
    data = {"x": _randn(SEQ, BATCH, HIDDEN, seed=1), "weight": _randn(OUT, HIDDEN, seed=2) * 0.2,
            "bias": _randn(OUT, seed=3), "dy": _randn(SEQ, BATCH, OUT, seed=4)}
    return {k: v.to(dtype) for k, v in data.items()}


# ----- worker side -------------------------------------------------------------------------------
def _local_inputs(ps, data):
    """This rank's sequence chunk of x and its columns of the output gradient."""
    x = data["x"].chunk(TP)[ps.tp_rank].clone().requires_grad_()
    return x, data["dy"].chunk(TP, dim=-1)[ps.tp_rank]


def _layer(ps, data, dtype):
    layer = ColumnParallelLinear(HIDDEN, OUT, ps=ps, sequence_parallel=True, dtype=dtype)
    load_full_weights(layer, {"weight": data["weight"], "bias": data["bias"]}, ps)
    return layer


def run_layer(ps, dtype):
    """Output, gradients, saved tensors (dtype, shape), tp bytes (forward, total), hook calls."""
    data = full_data(dtype)
    layer = _layer(ps, data, dtype)
    hooked = []
    layer.weight.register_post_accumulate_grad_hook(lambda p: hooked.append("weight"))
    layer.bias.register_post_accumulate_grad_hook(lambda p: hooked.append("bias"))
    x, dy = _local_inputs(ps, data)
    saved = []
    before = ps.counter.snapshot()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        y = layer(x)
    fwd_bytes = ps.counter.since(before)["tp_bytes"]
    y.backward(dy)
    total_bytes = ps.counter.since(before)["tp_bytes"]
    return dict(y=y.detach(), dx=x.grad, dw=layer.weight.grad, db=layer.bias.grad, saved=saved,
                bytes=(fwd_bytes, total_bytes), hooked=sorted(hooked))


def run_gather_then_linear(ps, dtype):
    """The path this replaces: all-gather (reduce-scatter in backward), then `F.linear`."""
    data = full_data(dtype)
    layer = _layer(ps, data, dtype)
    x, dy = _local_inputs(ps, data)
    y = F.linear(mappings.gather_from_sequence_parallel_region(x, ps), layer.weight, layer.bias)
    y.backward(dy)
    return dict(y=y.detach(), dx=x.grad, dw=layer.weight.grad, db=layer.bias.grad)


def frozen_weight_bytes(ps):
    """tp bytes of forward + backward when the weight needs no gradient: no re-gather."""
    data = full_data(torch.float32)
    layer = _layer(ps, data, torch.float32)
    layer.weight.requires_grad_(False)
    x, dy = _local_inputs(ps, data)
    before = ps.counter.snapshot()
    layer(x).backward(dy)
    return ps.counter.since(before)["tp_bytes"]


def worker(rank, world_size):
    ps = ParallelState.build(TP, 1)
    return {"layer": {dtype: run_layer(ps, dtype) for dtype in (torch.float32, torch.bfloat16)},
            "old": run_gather_then_linear(ps, torch.float32), "frozen_bytes": frozen_weight_bytes(ps)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, TP, timeout=120)


# ----- checks ------------------------------------------------------------------------------------
def single_process(dtype) -> dict:
    data = full_data(torch.float64)
    x, w, b = (data[k].clone().requires_grad_() for k in ("x", "weight", "bias"))
    y = F.linear(x, w, b)
    y.backward(data["dy"])
    return {k: v.detach().to(dtype) for k, v in dict(y=y, dx=x.grad, dw=w.grad, db=b.grad).items()}


# sharded dim of each result across ranks: output and parameter gradients by output feature,
# the input gradient by sequence
_SHARD_DIM = {"y": -1, "dx": 0, "dw": 0, "db": 0}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_a_single_process(results, dtype, tol):
    ref = single_process(dtype)
    for key, dim in _SHARD_DIM.items():
        joined = torch.cat([results[rank]["layer"][dtype][key] for rank in range(TP)], dim=dim)
        assert joined.dtype == dtype, key
        torch.testing.assert_close(joined.float(), ref[key].float(), rtol=tol, atol=tol, msg=key)


def test_same_bits_as_gathering_then_linear(results):
    for rank in range(TP):
        new, old = results[rank]["layer"][torch.float32], results[rank]["old"]
        for key in _SHARD_DIM:
            assert torch.equal(new[key], old[key]), (rank, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_only_its_local_input_chunk(results, dtype):
    local_x = (dtype, (SEQ // TP * BATCH, HIDDEN))  # this rank's rows of x, as the GEMM takes them
    for rank in range(TP):  # the weight is the parameter itself, read again in backward
        assert results[rank]["layer"][dtype]["saved"] == [local_x]


def test_parameter_gradients_go_through_autograd(results):
    for rank in range(TP):
        assert results[rank]["layer"][torch.float32]["hooked"] == ["bias", "weight"]


def test_tp_bytes(results):
    """Ring model, tp = 2: each gather or reduce-scatter of the [s, b, h] input sends half of it.
    Backward re-gathers the input and reduce-scatters its gradient; without a weight gradient
    there is nothing to re-gather."""
    for dtype in (torch.float32, torch.bfloat16):
        half = SEQ * BATCH * HIDDEN * dtype.itemsize // TP
        for rank in range(TP):
            assert results[rank]["layer"][dtype]["bytes"] == (half, 3 * half)
    for rank in range(TP):
        assert results[rank]["frozen_bytes"] == 2 * SEQ * BATCH * HIDDEN * 4 // TP
