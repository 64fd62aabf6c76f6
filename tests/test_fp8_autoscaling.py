"""The auto-scaling statistic of the FP8 gradient reduction (FP8-LM, section 2.1): the fraction of
mu-scaled gradient values that saturate at the cast before the sum or in the sum, at every
data-parallel size, checked against a float64 count on the same tensors, and the auto-scaler's
decision on gradients where mu = 2 clips more than the threshold."""

import pytest
import torch

import fp8
from distributed import run_distributed
from fp8.autoscale import GradientAutoScaler
from fp8.collectives import ProcessGroupTransport, fp8_all_reduce, fp8_reduce_to_owners

MAX = 448.0
SHAPES = [(64, 96), (3000,)]


def case_grads(rank: int, world: int, case: str) -> list[fp8.ScalingTensor]:
    """FP8 gradients (power-of-two scales, so every rescale is exact) for one rank.

    "clip": 1% of the values in (0.55, 1] x amax, the rest below 0.3 x amax, each value non-zero
    on one rank only (the sums add zeros): mu = 2 clips about 1% at the cast, nothing in the sum.
    "sum": the same values on every rank: at mu = 1 the large ones saturate in the sum.
    "tiny": many values near the bottom of E4M3's range: dividing by the rank count flushes them.
    """
    out = []
    for i, shape in enumerate(SHAPES):
        g = torch.Generator().manual_seed(17 * i + (0 if case == "sum" else rank))
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 0.3
        big = torch.rand(shape, generator=g) < 0.01
        x[big] = 0.55 + 0.45 * torch.rand(int(big.sum()), generator=g, dtype=torch.float64)
        x = x * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        if case == "tiny":
            x = x * 2.0 ** -12
        if case == "clip":
            owner = torch.arange(x.numel()).reshape(shape) % world
            x = torch.where(owner == rank, x, torch.zeros_like(x))
        x.reshape(-1)[rank] = 1.0  # amax 1 on every rank, in an element this rank owns in "clip"
        # One scale for "clip" (a smaller scale elsewhere would leave this rank room to grow);
        # two different ones in the other cases.
        scale = torch.tensor(MAX / 2 ** (0 if case == "clip" else rank % 2), dtype=torch.float32)
        out.append(fp8.quantize(x, "e4m3", scale=scale))
    return out


def float64_counts(world: int, case: str, mu: float) -> dict:
    """The statistics counted in float64 from every rank's tensors."""
    per_rank = [case_grads(r, world, case) for r in range(world)]
    saturated = sum_saturated = flushed = nonzero = 0
    for i in range(len(SHAPES)):
        shared = min(float(g[i].scale) for g in per_rank)
        casts = []
        for g in per_rank:
            scaled = g[i].data.double() * (mu * shared / float(g[i].scale))
            cast = scaled.clamp(-MAX, MAX).float().to(torch.float8_e4m3fn).double()
            saturated += int((scaled.abs() > MAX).sum())
            flushed += int(((scaled != 0) & (cast == 0)).sum())
            nonzero += int((scaled != 0).sum())
            casts.append(cast)
        sum_saturated += int((sum(casts).abs() > MAX).sum()) if world > 1 else 0
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    return {"overflow_frac": saturated / (world * numel) + sum_saturated / numel,
            "underflow_frac": flushed / nonzero, "presum_saturated": saturated, "sum_saturated": sum_saturated}


CASES = [("clip", 2.0), ("clip", 1.0), ("sum", 1.0), ("sum", 0.25), ("tiny", 0.25)]


def stats_worker(rank, world_size):
    transport = ProcessGroupTransport()
    out = {}
    for case, mu in CASES:
        grads = case_grads(rank, world_size, case)
        reduced = fp8_all_reduce(grads, transport, mu=mu).stats
        owned = fp8_reduce_to_owners(grads, [1 % world_size, 0], transport, mu=mu).stats
        out[case, mu] = (reduced, owned)
    return out


def check_stats(results: list[dict], world: int) -> None:
    for case, mu in CASES:
        expected = float64_counts(world, case, mu)
        for rank_result in results:
            for stats in rank_result[case, mu]:  # all-reduce and reduce-to-owners agree on every rank
                assert stats.presum_saturated == expected["presum_saturated"], (case, mu)
                assert stats.sum_saturated == expected["sum_saturated"], (case, mu)
                assert stats.overflow_frac == pytest.approx(expected["overflow_frac"], rel=1e-12, abs=0)
                assert stats.underflow_frac == pytest.approx(expected["underflow_frac"], rel=1e-12, abs=0)


def test_statistics_match_a_float64_count_at_one_rank():
    check_stats([stats_worker(0, 1)], 1)


@pytest.mark.distributed
def test_statistics_match_a_float64_count_at_four_ranks():
    results = run_distributed(stats_worker, 4)
    check_stats(results, 4)
    by_case = {key: results[0][key][0] for key in results[0]}
    # The cases do what their names say: mu = 2 clips at the cast only, identical gradients
    # saturate in the sum, dividing by the rank count flushes small values.
    assert by_case["clip", 2.0].presum_saturated > 0 and by_case["clip", 2.0].sum_saturated == 0
    assert by_case["sum", 1.0].sum_saturated > 0 and by_case["sum", 0.25].sum_saturated == 0
    assert by_case["tiny", 0.25].underflow_frac > by_case["sum", 0.25].underflow_frac


def halving_worker(rank, world_size):
    """Two steps of the auto-scaler at mu = 2 on gradients that mu = 2 clips by about 1%."""
    scaler = GradientAutoScaler(ratio=1e-5, window=1000, init_mu=2.0)
    transport = ProcessGroupTransport()
    mus = [scaler.mu]
    for _ in range(2):
        stats = fp8_all_reduce(case_grads(rank, world_size, "clip"), transport, mu=scaler.mu).stats
        mus.append(scaler.update(stats.overflow_frac))
    return mus


@pytest.mark.parametrize("world", [1, pytest.param(4, marks=pytest.mark.distributed)])
def test_mu_halves_when_mu_2_clips_more_than_the_ratio(world):
    # Sums never exceed the maximum here (one non-zero value per element), so a statistic that
    # watched only the sums would keep mu at 2 and clip 1% of the gradient every step.
    results = [halving_worker(0, 1)] if world == 1 else run_distributed(halving_worker, world)
    for mus in results:
        assert mus == [2.0, 1.0, pytest.approx(1.0 * 2 ** (1 / 1000))]  # halve, then climb again
