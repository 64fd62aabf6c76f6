"""Scales from amax, delayed scaling, tiles, and ScalingTensor against float64 references."""

import math

import pytest
import torch

import fp8
from fp8.scaling import DelayedScaling, DelayedScalingGroup, expand_tiles, tile_amax


@pytest.mark.parametrize("fmt_max", [448.0, 57344.0, 65504.0])
def test_scale_is_the_correctly_rounded_quotient(fmt_max):
    """fmt_max / amax rounded once to float32: float64 division then rounding to float32 gives
    that (53 >= 2 x 24 + 2 bits, so the double rounding is innocuous). Taking amax's reciprocal
    first and multiplying rounds twice and is one ulp off for about a quarter of amaxes."""
    gen = torch.Generator().manual_seed(0)
    amax = torch.exp(torch.empty(20000).uniform_(-12, 12, generator=gen)).float()
    exact = (fmt_max / amax.double()).float()
    assert torch.equal(fp8.compute_scale(amax, fmt_max), exact)
    assert torch.equal(fp8.compute_scale(amax, fmt_max, margin=3), (fmt_max / 8 / amax.double()).float())
    twice = amax.reciprocal() * fmt_max
    assert (twice != exact).float().mean().item() > 0.05  # the check would catch the old formula


def test_compute_scale_margin_and_power_of_two():
    amax = torch.tensor(3.0)
    assert fp8.compute_scale(amax, 448.0).item() == pytest.approx(448.0 / 3.0)
    assert fp8.compute_scale(amax, 448.0, margin=2).item() == pytest.approx(448.0 / 3.0 / 4)
    # 149.33 rounds down to 128: the scaled amax stays within the format.
    assert fp8.compute_scale(amax, 448.0, power_of_two=True).item() == 128.0
    assert fp8.compute_scale(torch.tensor(448.0), 448.0, power_of_two=True).item() == 1.0
    tiled = fp8.compute_scale(torch.tensor([[1.0, 2.0], [0.5, 448.0]]), 448.0)
    torch.testing.assert_close(tiled, torch.tensor([[448.0, 224.0], [896.0, 1.0]]))


@pytest.mark.parametrize("bad", [0.0, math.inf, math.nan, 1e-45])
def test_uninformative_amax_keeps_previous_scale(bad):
    prev = torch.tensor(7.0)
    assert fp8.compute_scale(torch.tensor(bad), 448.0, prev_scale=prev).item() == 7.0
    assert fp8.compute_scale(torch.tensor(bad), 448.0).item() == 1.0


def test_delayed_scaling_uses_the_history_window():
    scaler = DelayedScaling(fp8.E4M3, history_len=3, algo="max")
    amaxes = [4.0, 1.0, 2.0, 0.5, 0.25, 0.25]
    used = [scaler.scale_for(torch.tensor(a)).item() for a in amaxes]
    # First cast: its own amax. Then the max over the last (up to) 3 recorded amaxes.
    expected_amax = [4.0, 4.0, 4.0, 4.0, 2.0, 2.0]
    assert used == pytest.approx([448.0 / a for a in expected_amax])
    assert scaler.scale.item() == pytest.approx(448.0 / 0.5)  # window now 0.5, 0.25, 0.25


def test_delayed_scaling_most_recent_and_state_round_trip():
    scaler = DelayedScaling(fp8.E5M2, history_len=8, algo="most_recent", margin=1)
    for a in [10.0, 3.0]:
        scaler.scale_for(torch.tensor(a))
    assert scaler.scale.item() == pytest.approx(57344.0 / 3.0 / 2)
    other = DelayedScaling(fp8.E5M2, history_len=8, algo="most_recent", margin=1)
    other.load_state_dict(scaler.state_dict())
    assert other.scale_for(torch.tensor(100.0)).item() == scaler.scale_for(torch.tensor(100.0)).item()
    torch.testing.assert_close(other.amax_history, scaler.amax_history)


def test_delayed_scaling_ignores_non_finite_amax():
    scaler = DelayedScaling(fp8.E4M3, history_len=1)
    scaler.scale_for(torch.tensor(2.0))
    before = scaler.scale.item()
    scaler.scale_for(torch.tensor(math.inf))
    assert scaler.scale.item() == before


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_a_group_updates_once_per_step_as_each_scaler_would_record_its_step_maximum(algo, power_of_two):
    """Scalers in a DelayedScalingGroup, cast several times per step (some steps not at all, some
    amaxes NaN or zero): every cast of a step uses the scale the step started with, and after
    `update()` each history and scale are, to the bit, those of a lone scaler that records the
    step's largest finite amax once. The first step scales each cast from its own amax."""
    gen = torch.Generator().manual_seed(3)
    specs = [fp8.E4M3, fp8.E5M2, fp8.E4M3, fp8.E4M3]
    grouped = [DelayedScaling(spec, history_len=4, algo=algo, margin=1, power_of_two=power_of_two) for spec in specs]
    alone = [DelayedScaling(spec, history_len=4, algo=algo, margin=1, power_of_two=power_of_two) for spec in specs]
    group = DelayedScalingGroup(grouped)
    assert len(group) == 4
    for step in range(9):
        for i, (g, a) in enumerate(zip(grouped, alone)):
            if (step + i) % 4 == 3:
                continue  # not cast this step: its history stays as it is
            amaxes = torch.exp(torch.empty(3).uniform_(-20, 20, generator=gen))
            if step == 5:
                amaxes[1] = math.nan
            if step == 6:
                amaxes[:] = 0.0
            start = a.scale.clone()
            used = [g.scale_for(amax.clone()) for amax in amaxes]
            if a.num_recorded == 0:
                assert all(torch.equal(u, fp8.compute_scale(m, g.spec.max, 1, power_of_two))
                           for u, m in zip(used, amaxes))
                a.scale = used[0]
            else:
                assert all(torch.equal(u, start) for u in used)
            a.record(amaxes.nan_to_num(nan=0.0).max())
        group.update()
        for g, a in zip(grouped, alone):
            assert torch.equal(g.amax_history, a.amax_history) and g.num_recorded == a.num_recorded
            assert torch.equal(g.scale, a.scale), (step, g.scale, a.scale)
    # A grouped scaler's state resumes into a lone one.
    other = DelayedScaling(fp8.E4M3, history_len=4, algo=algo, margin=1, power_of_two=power_of_two)
    other.load_state_dict(grouped[0].state_dict())
    assert torch.equal(other.scale_for(torch.tensor(1.0)), grouped[0].scale)


def test_a_group_update_launches_the_same_kernels_for_any_number_of_scalers():
    """The update's cost does not grow with the model: the same kernel-launching operations
    (views aside) for 2 or 64 scalers of one format, against about ten per cast for a lone scaler."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.launch_audit import op_kind

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if op_kind(func) == "launch":
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 64):
        group = DelayedScalingGroup([DelayedScaling(fp8.E4M3, history_len=16) for _ in range(n)])
        for step in range(2):
            for scaler in [s for members in group._members.values() for s in members]:
                scaler.scale_for(torch.rand(()) + 0.5)
                scaler.scale_for(torch.rand(()) + 0.5)
            if step == 0:
                group.update()
        with Count() as count:
            group.update()
        counts.append(sorted(count.ops))
    assert counts[0] == counts[1] and len(counts[0]) < 20
    with pytest.raises(ValueError, match="one DelayedScalingGroup"):
        DelayedScalingGroup([next(iter(group._members.values()))[0]])


def test_bad_scaling_config_is_a_clear_error():
    with pytest.raises(ValueError, match="history length"):
        DelayedScaling(fp8.E4M3, history_len=0)
    with pytest.raises(ValueError, match="--fp8-recipe"):
        fp8.Recipe(recipe="mxfp8")
    with pytest.raises(ValueError, match="granularity"):
        fp8.quantize(torch.ones(4, 4), granularity="column")


@pytest.mark.parametrize("shape,tile", [((5, 300), (1, 128)), ((130, 260), (128, 128)), ((7, 33), (1, 33))])
def test_tile_amax_matches_a_loop(shape, tile):
    x = torch.randn(shape, dtype=torch.float64)
    got = tile_amax(x, tile)
    rows = range(0, shape[0], tile[0])
    cols = range(0, shape[1], tile[1])
    ref = torch.tensor([[x[r:r + tile[0], c:c + tile[1]].abs().max().item() for c in cols] for r in rows])
    torch.testing.assert_close(got, ref.float())
    assert expand_tiles(got, shape, tile).shape == shape


@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantize_error_is_half_an_ulp(granularity, fmt):
    torch.manual_seed(0)
    spec = fp8.get_spec(fmt)
    x = torch.randn(96, 320, dtype=torch.float64) * torch.logspace(-2, 2, 320, dtype=torch.float64)
    q = fp8.quantize(x, fmt, granularity=granularity)
    deq = q.dequantize(torch.float64)
    scale = expand_tiles(q.scale.double(), (96, 320), q.tile)
    scaled = (x * scale).abs()
    normal = scaled >= spec.min_normal
    rel_err = ((deq - x).abs() / x.abs())[normal]
    assert rel_err.max().item() <= 2.0 ** -(spec.mantissa_bits + 1) * (1 + 1e-6)
    # Subnormal range: absolute error at most half the smallest step, in scaled units.
    abs_err = ((deq - x).abs() * scale)[~normal]
    if abs_err.numel():
        assert abs_err.max().item() <= spec.min_subnormal / 2 * (1 + 1e-6)
    # The scale maps each tile's amax onto the format maximum.
    assert (x * scale).abs().max().item() == pytest.approx(spec.max, rel=1e-6)


def test_scale_shapes_per_granularity():
    x = torch.randn(4, 50, 300)
    assert fp8.quantize(x, granularity="tensor").scale.shape == ()
    assert fp8.quantize(x, granularity="row").scale.shape == (200, 1)
    assert fp8.quantize(x, granularity="block").scale.shape == (200, 3)
    assert fp8.quantize(x.reshape(200, 300), granularity="block", role="weight").scale.shape == (2, 3)
    with pytest.raises(ValueError, match="does not fit"):
        fp8.quantize(x, scale=torch.ones(3), granularity="tensor")


def test_given_scale_is_used_verbatim():
    x = torch.tensor([1.0, -0.5, 3.0])
    q = fp8.quantize(x, "e4m3", scale=4.0)
    assert q.data.float().tolist() == [4.0, -2.0, 12.0]
    assert q.dequantize().tolist() == [1.0, -0.5, 3.0]


@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_transpose_is_exact(granularity):
    x = torch.randn(200, 136)
    q = fp8.quantize(x, granularity=granularity, role="weight")
    torch.testing.assert_close(q.t().dequantize(), q.dequantize().t(), rtol=0, atol=0)


def test_nbytes_counts_payload_and_scales():
    x = torch.randn(256, 512)
    assert fp8.quantize(x).nbytes == 256 * 512 + 4
    assert fp8.quantize(x, granularity="block").nbytes == 256 * 512 + 256 * 4 * 4
    assert fp8.quantize(x, "fp16").nbytes == 256 * 512 * 2 + 4


def test_fp16_with_scale_keeps_small_values():
    # FP16 master weights with a per-tensor scale: values below FP16's normal range survive.
    x = torch.randn(1000, dtype=torch.float64) * 1e-7
    plain = x.half().double()
    scaled = fp8.quantize(x, "fp16").dequantize(torch.float64)
    assert fp8.sqnr_db(x, scaled) > 60 > fp8.sqnr_db(x, plain)


def test_state_dict_round_trip():
    q = fp8.quantize(torch.randn(130, 256), granularity="block", role="weight")
    back = fp8.ScalingTensor.from_state_dict(q.state_dict())
    assert back.tile == q.tile and back.fmt == q.fmt
    torch.testing.assert_close(back.dequantize(), q.dequantize(), rtol=0, atol=0)
    plain = fp8.quantize(torch.randn(3, 3))
    assert fp8.ScalingTensor.from_state_dict(plain.state_dict()).tile is None


def test_requantize_changes_tiles():
    x = torch.randn(256, 256)
    q = fp8.quantize(x, granularity="row")
    col = fp8.requantize(q, tile=(256, 1))
    assert col.scale.shape == (1, 256)
    assert fp8.sqnr_db(x, col.dequantize()) > 25


def test_accumulate_sums_in_fp32_and_keeps_overflow():
    torch.manual_seed(1)
    parts = [torch.randn(64, 64) * (i + 1) for i in range(4)]
    acc = None
    for p in parts:
        acc = fp8.accumulate(acc, p)
    exact = sum(parts)
    assert acc.fmt == "e4m3"
    assert fp8.sqnr_db(exact, acc.dequantize()) > 25
    bad = fp8.accumulate(acc, torch.full((64, 64), math.inf))
    assert bad.dequantize().isnan().all()


def test_compute_scale_copies_no_python_number_to_the_device():
    """The fallback scale for a zero or non-finite amax (1.0, or a previous scale given as a
    number) is made on the scale's device (a fill), never a host tensor copied there (on CUDA that
    is a host-to-device copy and a stream sync on every cast). The values are unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.devices = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket.__name__))
            if "device" in (kwargs or {}):
                self.devices.append(kwargs["device"])
            return func(*args, **(kwargs or {}))

    amax = torch.tensor([0.0, 2.0, float("inf"), 448.0])
    for prev, fallback in ((None, 1.0), (0.25, 0.25), (torch.tensor(0.5), 0.5)):
        with Ops() as ops:
            scale = fp8.compute_scale(amax, 448.0, prev_scale=prev)
        assert not {"lift_fresh", "_to_copy", "copy_"} & set(ops.names), ops.names  # lift_fresh: host data
        assert all(device == amax.device for device in ops.devices), ops.devices
        assert scale.tolist() == [fallback, 224.0, fallback, 1.0]
