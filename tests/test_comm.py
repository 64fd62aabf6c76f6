"""comm: every collective against a single-process reference, float8 payloads, and exact byte
counts under DESIGN.md's ring model."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _data(rank: int, shape, dtype=torch.float32, salt: int = 0) -> torch.Tensor:
    """The tensor `rank` contributes; the parent rebuilds every rank's to form references."""
    generator = torch.Generator().manual_seed(1000 * salt + rank)
    values = torch.randn(shape, generator=generator) * 4
    return values.to(dtype)


def _bytes(**counts) -> dict:
    return {f"{bucket}_bytes": counts.get(bucket, 0) for bucket in ("dp", "tp", "pp")}


# ----- pure --------------------------------------------------------------------------------------
def test_ring_model():
    assert comm.ring_bytes("all_reduce", 1000, 4) == 1500
    assert comm.ring_bytes("reduce_scatter", 1000, 4) == 750
    assert comm.ring_bytes("all_gather", 1000, 2) == 500
    assert comm.ring_bytes("all_to_all", 1000, 8) == 875
    assert comm.ring_bytes("send", 1000, 2) == 1000
    assert comm.ring_bytes("all_reduce", 1000, 1) == 0


def test_counter_snapshot_since_reset():
    counter = comm.CommCounter()
    counter.add("tp", 10)
    before = counter.snapshot()
    counter.add("dp", 5)
    counter.add("embedding", 3)
    assert counter.snapshot() == _bytes(tp=10, dp=5, pp=3)
    assert counter.since(before) == _bytes(dp=5, pp=3)
    counter.reset()
    assert counter.snapshot() == _bytes()
    with pytest.raises(ValueError, match="unknown group 'world'"):
        counter.add("world", 1)
    # Each ParallelState carries its own counter, shared with its replaced copies only.
    ps, other = ParallelState.single("cpu"), ParallelState.single("cpu")
    assert ps.counter is not other.counter and ps.replace(device=torch.device("cpu")).counter is ps.counter


def test_single_process_collectives_are_free_identities():
    ps = ParallelState.single("cpu")
    before = ps.counter.snapshot()
    x = torch.randn(4, 3)
    assert comm.all_reduce(x, ps, "dp") is x
    assert comm.all_gather(x, ps, "tp", dim=1) is x
    assert comm.reduce_scatter(x, ps, "tp") is x
    assert comm.broadcast(x, ps, "pp") is x
    assert comm.all_to_all([x], ps, "dp")[0] is x
    assert comm.all_reduce_scalar(2.5, ps, "dp") == 2.5
    assert ps.counter.since(before) == _bytes()


# ----- four processes: tp=2 x pp=2 for tp/pp, and a dp=4 layout ----------------------------------
def _measure(results: dict, name: str, op, counter: comm.CommCounter):
    before = counter.snapshot()
    results[name] = op()
    results[name + ":bytes"] = counter.since(before)


def _collectives_worker(rank, world_size, fused):
    if fused:
        # The CUDA (NCCL) code path, exercised on CPU where this torch's gloo has the fused ops.
        comm._use_fused = lambda t: True
    grid = ParallelState.build(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    flat = ParallelState.build().replace(counter=grid.counter)  # dp = 4; one counter for both
    out = {}
    _measure(out, "all_reduce_tp", lambda: comm.all_reduce(_data(rank, (3, 5)), grid, "tp"), grid.counter)
    _measure(out, "all_reduce_dp_bf16", lambda: comm.all_reduce(_data(rank, (4, 6), torch.bfloat16), flat, "dp"), grid.counter)
    _measure(out, "all_reduce_max", lambda: comm.all_reduce_max(_data(rank, (7,)), flat, "dp"), grid.counter)
    noncontiguous = _data(rank, (5, 3)).t()
    comm.all_reduce(noncontiguous, grid, "tp")
    out["all_reduce_noncontiguous"] = noncontiguous
    _measure(out, "scalar", lambda: comm.all_reduce_scalar(rank + 0.5, flat, "dp"), grid.counter)
    _measure(out, "embedding", lambda: comm.all_reduce(_data(rank, (2,)), grid, "embedding"), grid.counter)

    _measure(out, "gather_tp_dim0", lambda: comm.all_gather(_data(rank, (2, 3)), grid, "tp"), grid.counter)
    _measure(out, "gather_tp_last", lambda: comm.all_gather(_data(rank, (4, 3)), grid, "tp", dim=-1), grid.counter)
    for dtype in FP8_DTYPES:
        _measure(out, f"gather_dp_{dtype}", lambda: comm.all_gather(_data(rank, (2, 3, 4), dtype), flat, "dp", dim=1), grid.counter)

    _measure(out, "reduce_scatter_dp", lambda: comm.reduce_scatter(_data(rank, (8, 3)), flat, "dp"), grid.counter)
    _measure(out, "reduce_scatter_tp_dim1", lambda: comm.reduce_scatter(_data(rank, (3, 4)), grid, "tp", dim=1), grid.counter)

    equal = [_data(rank, (2, 2), salt=j + 1) for j in range(4)]
    _measure(out, "all_to_all", lambda: comm.all_to_all(equal, flat, "dp"), grid.counter)
    # Uneven, FP8: rank r sends (r + 1) x (j + 1) values to rank j, as a ZeRO owner exchange would.
    uneven = [_data(rank, (rank + 1, j + 1), torch.float8_e4m3fn, salt=j + 1) for j in range(4)]
    shapes = [(j + 1, rank + 1) for j in range(4)]
    _measure(out, "all_to_all_fp8", lambda: comm.all_to_all(uneven, flat, "dp", output_shapes=shapes), grid.counter)

    _measure(out, "broadcast", lambda: comm.broadcast(_data(rank, (3,), torch.float8_e5m2), grid, "tp", 1), grid.counter)
    _p2p_checks(rank, grid, out)
    _error_checks(rank, grid, flat, out)
    return out


def _p2p_checks(rank, grid, out):
    payload = _data(rank, (2, 4), torch.float8_e4m3fn)
    if grid.is_first_stage:
        _measure(out, "send", lambda: comm.send(payload, grid.next_rank, grid), grid.counter)
    else:
        _measure(out, "send", lambda: comm.recv(torch.empty_like(payload), grid.prev_rank, grid), grid.counter)
    # Both stages at once, the 1F1B steady state: must not deadlock.
    inbox = torch.empty(3, 2)
    _measure(out, "exchange", lambda: comm.send_recv(grid, sends=[(_data(rank, (3, 2)), grid.next_rank)],
                                                      recvs=[(inbox, grid.prev_rank)]), grid.counter)
    out["exchange"] = inbox


def _error_checks(rank, grid, flat, out):
    errors = []
    for op in (lambda: comm.all_reduce(torch.zeros(2, dtype=torch.float8_e4m3fn), grid, "tp"),
               lambda: comm.reduce_scatter(torch.zeros(3), flat, "dp"),
               lambda: comm.all_to_all([torch.zeros(1)], flat, "dp")):
        try:
            op()
        except ValueError as error:
            errors.append(str(error))
    out["errors"] = errors


def _gloo_has_fused_collectives() -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 13)  # gloo's all_gather_single / reduce_scatter_single and coalesced p2p


@pytest.fixture(scope="module", params=["list-collectives", "fused-collectives"])
def four_ranks(request):
    fused = request.param == "fused-collectives"
    if fused and not _gloo_has_fused_collectives():
        pytest.skip("this torch's gloo lacks the fused collectives the CUDA path uses")
    return run_distributed(_collectives_worker, 4, fused)


def _tp_peers(rank):
    return [rank - rank % 2, rank - rank % 2 + 1]


@pytest.mark.distributed
def test_reductions(four_ranks):
    for rank, out in enumerate(four_ranks):
        peers = _tp_peers(rank)
        torch.testing.assert_close(out["all_reduce_tp"], sum(_data(r, (3, 5)) for r in peers))
        bf16_ref = sum(_data(r, (4, 6), torch.bfloat16).float() for r in range(4))
        torch.testing.assert_close(out["all_reduce_dp_bf16"].float(), bf16_ref, rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(out["all_reduce_max"], torch.stack([_data(r, (7,)) for r in range(4)]).amax(0))
        torch.testing.assert_close(out["all_reduce_noncontiguous"], sum(_data(r, (5, 3)) for r in peers).t())
        assert out["scalar"] == pytest.approx(0.5 + 1.5 + 2.5 + 3.5)
        torch.testing.assert_close(out["embedding"], _data(rank % 2, (2,)) + _data(rank % 2 + 2, (2,)))
        assert out["all_reduce_tp:bytes"] == _bytes(tp=60)  # 2 * (2-1)/2 * 60
        assert out["all_reduce_dp_bf16:bytes"] == _bytes(dp=72)  # 2 * 3/4 * 48
        assert out["scalar:bytes"] == _bytes(dp=12)  # float64
        assert out["embedding:bytes"] == _bytes(pp=8)


@pytest.mark.distributed
def test_gathers_and_reduce_scatters(four_ranks):
    for rank, out in enumerate(four_ranks):
        peers = _tp_peers(rank)
        torch.testing.assert_close(out["gather_tp_dim0"], torch.cat([_data(r, (2, 3)) for r in peers]))
        torch.testing.assert_close(out["gather_tp_last"], torch.cat([_data(r, (4, 3)) for r in peers], dim=-1))
        for dtype in FP8_DTYPES:
            expected = torch.cat([_data(r, (2, 3, 4), dtype) for r in range(4)], dim=1)
            gathered = out[f"gather_dp_{dtype}"]
            assert gathered.dtype == dtype and torch.equal(gathered.view(torch.uint8), expected.view(torch.uint8))
            assert out[f"gather_dp_{dtype}:bytes"] == _bytes(dp=72)  # 3/4 * (4 * 24)
        full = sum(_data(r, (8, 3)) for r in range(4))
        torch.testing.assert_close(out["reduce_scatter_dp"], full[2 * rank:2 * rank + 2])
        full_tp = sum(_data(r, (3, 4)) for r in peers)
        torch.testing.assert_close(out["reduce_scatter_tp_dim1"], full_tp[:, 2 * (rank % 2):2 * (rank % 2) + 2])
        assert out["gather_tp_dim0:bytes"] == _bytes(tp=24)
        assert out["reduce_scatter_dp:bytes"] == _bytes(dp=72)  # 3/4 * 96, not the fallback's all-reduce
        assert out["reduce_scatter_tp_dim1:bytes"] == _bytes(tp=24)


@pytest.mark.distributed
def test_all_to_all_and_broadcast(four_ranks):
    for rank, out in enumerate(four_ranks):
        for src in range(4):
            torch.testing.assert_close(out["all_to_all"][src], _data(src, (2, 2), salt=rank + 1))
            received = out["all_to_all_fp8"][src]
            sent = _data(src, (src + 1, rank + 1), torch.float8_e4m3fn, salt=rank + 1)
            assert received.dtype == torch.float8_e4m3fn
            assert torch.equal(received.view(torch.uint8), sent.view(torch.uint8))
        assert out["all_to_all:bytes"] == _bytes(dp=48)  # 3/4 * 64
        sent_bytes = (rank + 1) * (1 + 2 + 3 + 4 - (rank + 1))  # to the other ranks; its own stays
        assert out["all_to_all_fp8:bytes"] == _bytes(dp=sent_bytes)
        expected = _data(_tp_peers(rank)[1], (3,), torch.float8_e5m2)
        assert torch.equal(out["broadcast"].view(torch.uint8), expected.view(torch.uint8))
        assert out["broadcast:bytes"] == _bytes(tp=3)


@pytest.mark.distributed
def test_pipeline_send_recv(four_ranks):
    for rank, out in enumerate(four_ranks):
        first_stage, peer = rank < 2, (rank + 2) % 4
        if not first_stage:
            expected = _data(peer, (2, 4), torch.float8_e4m3fn)
            assert torch.equal(out["send"].view(torch.uint8), expected.view(torch.uint8))
        assert out["send:bytes"] == _bytes(pp=8 if first_stage else 0)
        torch.testing.assert_close(out["exchange"], _data(peer, (3, 2)))
        assert out["exchange:bytes"] == _bytes(pp=24)


@pytest.mark.distributed
def test_user_mistakes_are_value_errors(four_ranks):
    for out in four_ranks:
        assert len(out["errors"]) == 3
        assert "cannot sum torch.float8_e4m3fn" in out["errors"][0]
        assert "divisible by the group size 4" in out["errors"][1]
        assert "needs one tensor per rank (4), got 1" in out["errors"][2]
