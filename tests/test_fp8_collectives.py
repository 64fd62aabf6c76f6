"""The FP8 gradient all-reduce (shared minimum scale, mu, FP32 sums of FP8 payloads) on real gloo
processes against a float64 reference, byte counts, and the auto-scaler's rule."""

import math

import pytest
import torch

import fp8
from distributed import run_distributed
from fp8.autoscale import GradientAutoScaler
from fp8.collectives import ProcessGroupTransport, fp8_all_reduce
from megatron.core.distributed.fp8_transport import CommTransport
from megatron.core.parallel_state import ParallelState

SHAPES = [(64, 48), (100,), (7, 3, 5)]


def rank_grads(rank: int, correlated: bool = False):
    """Per-rank gradients with rank-dependent ranges (so the ranks' scales differ)."""
    g = torch.Generator().manual_seed(0 if correlated else 100 + rank)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + (0 if correlated else rank)) * 10.0**i
            for i, shape in enumerate(SHAPES)]


def reduce_worker(rank, world_size, mu, correlated, poison_rank):
    grads = [fp8.quantize(x, "e4m3") for x in rank_grads(rank, correlated)]
    if rank == poison_rank:
        grads[1].data[3] = float("nan")
    result = fp8_all_reduce(grads, ProcessGroupTransport(), mu=mu)
    ps = ParallelState.build(1, 1)
    ps.counter.reset()
    counted = fp8_all_reduce([fp8.quantize(x, "e4m3") for x in rank_grads(rank)], CommTransport(ps, "dp"), mu=mu)
    return ([(t.data.view(torch.uint8).clone(), t.scale.clone()) for t in result.tensors], result.overflow_frac,
            result.nonfinite, ps.counter.snapshot()["dp_bytes"], counted.overflow_frac)


@pytest.fixture(scope="module")
def reduced():
    cases = {"mean4": (4, 0.5, False, -1), "mean2": (2, 0.5, False, -1),
             "overflow": (2, 1.0, True, -1), "prescaled": (2, 0.5, True, -1), "nan": (2, 0.5, False, 1)}
    return {name: (args, run_distributed(reduce_worker, args[0], *args[1:])) for name, args in cases.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["mean4", "mean2"])
def test_all_reduce_gives_the_mean_on_every_rank(reduced, case):
    (world, mu, _, _), results = reduced[case]
    first = results[0][0]
    for other in results[1:]:  # every rank holds the same bytes and scales
        for (a, sa), (b, sb) in zip(first, other[0]):
            assert torch.equal(a, b) and torch.equal(sa, sb)
    inputs = [[fp8.quantize(x, "e4m3") for x in rank_grads(r)] for r in range(world)]
    for i, (payload, scale) in enumerate(first):
        exact = sum(inputs[r][i].dequantize(torch.float64) for r in range(world)) / world
        got = fp8.ScalingTensor(payload.view(torch.float8_e4m3fn), scale, "e4m3").dequantize(torch.float64)
        assert fp8.sqnr_db(exact, got) > 24, i
        min_scale = min(inputs[r][i].scale for r in range(world))
        assert scale.item() == pytest.approx(world * mu * min_scale.item(), rel=1e-6)
    assert results[0][1] < 1e-3 and not results[0][2]


@pytest.mark.distributed
def test_overflow_is_measured_and_prescaling_removes_it(reduced):
    # Identical gradients on both ranks: with mu = 1 every value at the maximum doubles past it.
    overflow = reduced["overflow"][1][0][1]
    prescaled = reduced["prescaled"][1][0][1]
    assert overflow > 0 and prescaled == 0.0
    assert not reduced["overflow"][1][0][2]


@pytest.mark.distributed
def test_nan_on_one_rank_is_seen_by_all(reduced):
    for rank_result in reduced["nan"][1]:
        assert rank_result[2] is True and math.isnan(rank_result[1])


@pytest.mark.distributed
def test_bytes_counted_are_one_byte_per_value(reduced):
    (world, _, _, _), results = reduced["mean4"]
    numel = sum(math.prod(s) for s in SHAPES)
    padded = -(-numel // world) * world
    scales = len(SHAPES) * 4
    expected = (2 * (world - 1) * scales // world  # min-scale all-reduce
                + (world - 1) * padded // world  # all-to-all of the payload bytes
                + (world - 1) * padded // world  # all-gather of the reduced bytes
                + 2 * (world - 1) * 40 // world)  # the five statistics' counts
    assert results[0][3] == expected
    # An FP32 all-reduce of the same gradients moves 2 (n-1)/n x 4 bytes per value: 4x as much.
    assert expected < 0.26 * 2 * (world - 1) * 4 * numel / world


def test_single_process_reduction_is_a_requantization():
    grads = [fp8.quantize(x, "e4m3") for x in rank_grads(0)]
    result = fp8_all_reduce(grads, ProcessGroupTransport(), mu=1.0)
    for before, after in zip(grads, result.tensors):
        torch.testing.assert_close(after.dequantize(), before.dequantize(), rtol=0, atol=0)


def test_auto_scaler_halves_on_overflow_and_climbs_back_geometrically_over_the_window():
    scaler = GradientAutoScaler(ratio=1e-5, window=4, init_mu=1.0, max_mu=2.0)
    assert scaler.update(2e-5) == 0.5           # above the threshold: halve
    assert scaler.update(float("nan")) == 0.25  # not finite counts as overflow
    # Every clean step multiplies mu by (2 / 0.25) ** (1 / 4): 2 is reached at the end of the window.
    climb = [scaler.update(0.0) for _ in range(4)]
    assert climb == pytest.approx([0.25 * 8 ** (k / 4) for k in (1, 2, 3)] + [2.0], rel=1e-12)
    assert climb[-1] == 2.0 and scaler.update(0.0) == 2.0  # never above the cap
    assert scaler.update(1e-5) == 2.0           # at the threshold is below
    assert scaler.update(3e-5) == 1.0
    # A halving mid-climb restarts the climb from the halved value.
    assert scaler.update(0.0) == pytest.approx(2 ** 0.25)
    assert scaler.update(1.0) == pytest.approx(2 ** 0.25 / 2)
    assert scaler.update(0.0) == pytest.approx(2 ** -0.75 * (2 / 2 ** -0.75) ** 0.25)
    clone = GradientAutoScaler(ratio=1e-5, window=4)
    clone.load_state_dict(scaler.state_dict())
    assert [clone.update(0.0) for _ in range(4)] == [scaler.update(0.0) for _ in range(4)]
    old = GradientAutoScaler(window=4)
    old.load_state_dict({"mu": 0.5, "steps_below": 2})  # a checkpoint of the earlier rule
    assert [old.update(0.0) for _ in range(4)] == pytest.approx([0.5 * 4 ** (k / 4) for k in (1, 2, 3, 4)])


def test_auto_scaler_settings_are_checked():
    with pytest.raises(ValueError, match="--fp8-wgrad-auto-scaling-window"):
        GradientAutoScaler(window=0)
    with pytest.raises(ValueError, match="--fp8-wgrad-auto-scaling-ratio"):
        GradientAutoScaler(ratio=1.5)


def reduce_scatter_worker(rank, world_size):
    from fp8.collectives import fp8_reduce_scatter
    grads = [fp8.quantize(x, "e4m3") for x in rank_grads(rank)]
    result = fp8_reduce_scatter(grads, ProcessGroupTransport(), mu=0.25)
    return result.start, result.end, result.dequantize(grads).double(), result.stats.overflow_frac


@pytest.mark.distributed
def test_reduce_scatter_segments_cover_the_mean():
    results = run_distributed(reduce_scatter_worker, 4)
    inputs = [[fp8.quantize(x, "e4m3") for x in rank_grads(r)] for r in range(4)]
    exact = torch.cat([sum(inputs[r][i].dequantize(torch.float64) for r in range(4)).reshape(-1) / 4
                       for i in range(len(SHAPES))])
    per_rank = -(-exact.numel() // 4)
    assert [(r[0], r[1]) for r in results] == [(k * per_rank, min((k + 1) * per_rank, exact.numel())) for k in range(4)]
    pieces = torch.cat([r[2] for r in results])
    assert pieces.shape == exact.shape
    for r in results:  # within FP8 rounding, segment by segment
        assert fp8.sqnr_db(exact[r[0]:r[1]], r[2]) > 24
    assert len({r[3] for r in results}) == 1


COMMON = 1.0


def heavy_tailed(rank: int, step: int, shape=(64, 512)):
    """Heavy-tailed gradients (normal values with log-normal scales) whose column magnitudes span
    two decades, with a shared direction as strong as each rank's own part: correlated enough
    that summing 8 ranks overflows, spread enough that dividing by 8 first underflows. (Measured:
    pre 0 + 0.15%, post 0.42% + 0.07%, auto 0.02% + 0.10% overflow + underflow.)"""
    shared = torch.Generator().manual_seed(step)
    own = torch.Generator().manual_seed(1000 * step + rank + 1)
    magnitude = torch.logspace(-2, 0, shape[1], dtype=torch.float64)[torch.randperm(shape[1], generator=shared)]
    # Normal values with log-normal scales: heavy tails within each column.
    common = torch.randn(shape, generator=shared, dtype=torch.float64) * torch.randn(
        shape, generator=shared, dtype=torch.float64).exp()
    noise = torch.randn(shape, generator=own, dtype=torch.float64) * torch.randn(
        shape, generator=own, dtype=torch.float64).exp()
    return (COMMON * common + noise) * magnitude


def scaling_worker(rank, world_size):
    transport = ProcessGroupTransport()
    scaler = GradientAutoScaler(ratio=1e-5, window=4)
    for step in range(24):  # let the auto-scaler settle on this stream
        grads = [fp8.quantize(heavy_tailed(rank, step), "e4m3")]
        scaler.update(fp8_all_reduce(grads, transport, mu=scaler.mu).overflow_frac)
    grads = [fp8.quantize(heavy_tailed(rank, 99), "e4m3")]
    out = {}
    for name, mu in (("pre", 1.0 / world_size), ("post", 1.0), ("auto", scaler.mu)):
        result = fp8_all_reduce(grads, transport, mu=mu)
        out[name] = (result.overflow_frac, result.tensors[0].dequantize(torch.float64))
    return out, grads[0].dequantize(torch.float64)


@pytest.mark.slow
@pytest.mark.distributed
def test_auto_scaling_beats_pre_and_post_scaling():
    """Pre-scaling (divide by N, then sum) underflows, post-scaling (sum, then divide) overflows;
    auto-scaling has the smallest overflow + underflow fraction (FP8-LM, Figure 7)."""
    results = run_distributed(scaling_worker, 8, timeout=300)
    exact = sum(r[1] for r in results) / 8
    combined = {}
    for name in ("pre", "post", "auto"):
        overflow, reduced = results[0][0][name]
        underflow = ((reduced == 0) & (exact != 0)).double().mean().item()
        combined[name] = overflow + underflow
    assert results[0][0]["post"][0] > 1e-5      # post-scaling saturates
    assert combined["auto"] < combined["pre"] and combined["auto"] < combined["post"], combined


# ----- bounded rounds --------------------------------------------------------------------------
CHUNKS = (7, 64, 1 << 30)  # values per rank per round; the last is one round for everything


def _copies(grads):
    return [fp8.ScalingTensor(g.data.clone(), g.scale.clone(), "e4m3") for g in grads]


def chunk_worker(rank, world_size):
    """Every reduction at every chunk size, copied and in place: bytes, scales, stats, traffic."""

    from fp8.collectives import fp8_reduce_to_owners
    grads = [fp8.quantize(x, "e4m3") for x in rank_grads(rank)]
    owners = fp8.greedy_partition([g.numel() for g in grads], world_size)
    ps = ParallelState.build(1, 1)
    transport = CommTransport(ps, "dp")
    out = {}
    for chunk in CHUNKS:
        for in_place in (False, True):
            for kind in ("all", "owners"):
                inputs = _copies(grads)
                before = ps.counter.snapshot()
                if kind == "all":
                    result = fp8_all_reduce(inputs, transport, mu=0.5, chunk_numel=chunk, in_place=in_place)
                else:
                    result = fp8_reduce_to_owners(inputs, owners, transport, mu=0.5, chunk_numel=chunk,
                                                  in_place=in_place)
                sent = ps.counter.since(before)["dp_bytes"]
                tensors = [(t.data.view(torch.uint8).clone(), t.scale.clone()) if t is not None else None
                           for t in result.tensors]
                shared = [t is not None and t.data.data_ptr() == x.data.data_ptr()
                          for t, x in zip(result.tensors, inputs)]
                out[kind, chunk, in_place] = (tensors, result.stats.astuple(), sent, shared)
    return out


def expected_sent(numels: list[int], owners: list[int], n: int, rank: int, chunk: int, kind: str) -> int:
    """Bytes leaving `rank`, worked out from the algorithms' descriptions: an all-reduce of the
    scales (4 bytes each) and one of the five float64 counts (ring model, 2 (n-1)/n of the
    bytes); then either (owners, sent directly) every value of the tensors others own, once; or
    rounds of n x ceil(chunk / n) values, each rank's part of a round L = ceil(round / n) values,
    all-to-all'd ((n-1) L leave), then an all-gather of the parts ((n-1) L) for "all", or this
    rank's summed part sent on to the other owners of its values for "owners"."""
    from fp8.collectives import owner_rounds

    def all_reduce(nbytes):
        return 2 * (n - 1) * nbytes // n

    total, numel = all_reduce(4 * len(numels)) + all_reduce(40), sum(numels)
    if kind == "owners" and owner_rounds(numels, owners, n, chunk)[0] == "direct":
        return total + sum(size for size, owner in zip(numels, owners) if owner != rank)
    step = n * -(-chunk // n)
    for start in range(0, numel, step):
        part = -(-min(step, numel - start) // n)
        total += (n - 1) * part
        if kind == "all":
            total += (n - 1) * part
            continue
        lo, hi, begin = start + rank * part, min(start + (rank + 1) * part, numel), 0
        for size, owner in zip(numels, owners):
            if owner != rank:
                total += max(0, min(hi, begin + size) - max(lo, begin))
            begin += size
    return total


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_rounds_of_any_size_give_the_same_bits_and_bytes(world):
    """The reduction in rounds of 7 or 64 values per rank equals one round of everything: the
    same FP8 bytes, scales and statistics; the bytes sent are what the rounds' layout says
    (`expected_sent`); in place, the means sit in the inputs' own storage. FP8 ZeRO's reduction
    goes both ways here (`owner_rounds`: direct at the largest chunk, in rounds at 7 values, and
    at 64 with 3 ranks), so the two give the same bits."""
    numels = [x.numel() for x in rank_grads(0)]
    owners = fp8.greedy_partition(numels, world)
    for rank, out in enumerate(run_distributed(chunk_worker, world)):
        for kind in ("all", "owners"):
            reference = out[kind, CHUNKS[-1], False]
            for chunk in CHUNKS:
                for in_place in (False, True):
                    tensors, stats, sent, shared = out[kind, chunk, in_place]
                    assert stats == reference[1], (rank, kind, chunk, in_place)
                    assert sent == expected_sent(numels, owners, world, rank, chunk, kind), (rank, kind, chunk)
                    for got, want in zip(tensors, reference[0]):
                        assert (got is None) == (want is None)
                        if got is not None:
                            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                    held = [t is not None for t in tensors]
                    assert shared == (held if in_place else [False] * len(held))


def test_one_rank_copies_nothing_and_still_counts():
    """A group of one: the gradients are their own mean, returned as they are; the re-cast to mu
    is still counted (float64 reference), for the auto-scaler."""
    from fp8.collectives import fp8_reduce_to_owners
    grads = [fp8.quantize(x, "e4m3") for x in rank_grads(0)]
    grads[2].data[0, 0, 0] = float("nan")
    for mu in (0.25, 1.0, 2.0):
        for result in (fp8_all_reduce(grads, ProcessGroupTransport(), mu=mu, chunk_numel=50),
                       fp8_reduce_to_owners(grads, [0, 0, 0], ProcessGroupTransport(), mu=mu, chunk_numel=50)):
            assert all(t is g for t, g in zip(result.tensors, grads))
            values = torch.cat([g.data.double().reshape(-1) for g in grads]) * mu
            finite = torch.isfinite(values)
            saturated = int((values.abs() > 448).sum())
            stats = result.stats
            assert (stats.numel, stats.ranks, stats.sum_saturated) == (values.numel(), 1, 0)
            assert stats.presum_saturated == saturated and stats.nan == int((~finite).sum())
            assert stats.nonzero == int((values != 0).sum())


def test_statistics_of_several_buckets_are_read_from_the_device_once(monkeypatch):
    """A reduction leaves its counts on the device; adding the statistics of several buckets adds
    there, and the first read copies them to the host once (a GPU's only sync for them)."""
    from fp8.collectives import ReductionStats, fp8_all_reduce

    class Alone:
        size, rank = 1, 0

    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or original(t))
    gen = torch.Generator().manual_seed(0)
    buckets = [[fp8.quantize(torch.randn(64, 32, generator=gen) * 500, "e4m3") for _ in range(2)] for _ in range(3)]
    total = ReductionStats()
    for grads in buckets:
        total = total + fp8_all_reduce(grads, Alone(), mu=2.0).stats
    assert reads == []
    expected = [fp8_all_reduce(grads, Alone(), mu=2.0).stats for grads in buckets]
    assert total.numel == 3 * 2 * 64 * 32 and len(reads) == 0
    assert total.presum_saturated == sum(s.presum_saturated for s in expected) > 0
    assert len(reads) == 1 + 3  # the total's one read, then one per bucket for the reference
    assert total.astuple()[2:] == tuple(map(sum, zip(*(s.astuple()[2:] for s in expected))))
