"""FP8AdamW (fp8/optim.py) and stochastic rounding (fp8/stochastic.py), by value.

Reference: torch.optim.AdamW in FP32 (single-tensor path). The ablation tests reproduce the
paper's optimizer ablation (section 2.2) on least-squares problems and print what they measure.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import fp8
from fp8.gradients import FP8GradStore
from fp8.optim import ScaledFP16Parameter, is_scaled_fp16, make_scaled_fp16_param, scaled_value, to_scaled_fp16
from fp8.stochastic import step_toward, stochastic_round
from fp8_optim_support import FP32_STATES, FP8AdamW, hold, no_held_gradients  # noqa: F401 (fixture)
from fp8_optim_support import params_of as _params
from fp8_optim_support import take_steps as _steps


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of small ops: on shared cores, intra-op threads cost more in
    synchronisation than they gain (measured 4x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _least_squares(seed: int, w_mag: float, col_decades: float = 0.0):
    """X (512x64, column j scaled by 10**(-col_decades * j / 63)), targets of a 16x64 linear map
    with weights of magnitude `w_mag`, and an initial weight of the same magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=gen) * torch.logspace(0, -col_decades, 64)
    w_true = torch.randn(16, 64, generator=gen) * w_mag
    y = x @ w_true.T + 0.1 * w_mag * torch.randn(512, 16, generator=gen)
    return x, y, torch.randn(16, 64, generator=gen) * w_mag, torch.zeros(16)


def _mse(x, y, weights):
    return ((x @ weights[0].T + weights[1] - y) ** 2).mean()


def _train(opt, params, x, y, steps: int, *, use_held: bool) -> float:
    """`steps` full-batch steps on the least-squares loss of the parameters' true values."""
    for _ in range(steps):
        weights = [scaled_value(p).requires_grad_() for p in params]
        _mse(x, y, weights).backward()
        for p, w in zip(params, weights):
            if use_held:
                hold(p, w.grad)
            else:
                p.grad = w.grad
        opt.step()
    return _mse(x, y, [scaled_value(p) for p in params]).item()


def _reference(init, x, y, steps, lr, weight_decay=0.0):
    params = _params(*init)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    loss = _train(opt, params, x, y, steps, use_held=False)
    return [p.detach() for p in params], loss


def _fp8_run(init, x, y, steps, lr, *, weight_kind="scaled", weight_decay=0.0, **opt_kwargs):
    """The same training with FP8AdamW; the weight is an FP16 master with a scale ("scaled"),
    an unscaled fp16 / bf16 tensor, or fp32."""
    params = _params(*init)
    if weight_kind == "scaled":
        make_scaled_fp16_param(params[0])
    elif weight_kind != "fp32":
        params[0].data = params[0].data.to(getattr(torch, weight_kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FP8 second-moment warning, tested on its own
        opt = FP8AdamW(params, lr=lr, weight_decay=weight_decay, **opt_kwargs)
    loss = _train(opt, params, x, y, steps, use_held=True)
    return [scaled_value(p) for p in params], loss, opt


def _rel_dist(weights, ref) -> float:
    num = sum((a - b).pow(2).sum() for a, b in zip(weights, ref))
    return (num / sum(b.pow(2).sum() for b in ref)).sqrt().item()


# ------------------------------------------------------------------------ exactness vs torch

def test_fp32_states_match_torch_adamw_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(32, 16, generator=gen), torch.randn(16, generator=gen), torch.randn(8, 32, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(50)]
    ours, theirs = _params(*init), _params(*init)

    def groups(ps):
        return [{"params": [ps[0], ps[2]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]

    opt = FP8AdamW(groups(ours), lr=3e-3, betas=(0.9, 0.95), **FP32_STATES)
    ref = torch.optim.AdamW(groups(theirs), lr=3e-3, betas=(0.9, 0.95), foreach=False)
    for step, step_grads in enumerate(grads):
        if step == 25:  # a schedule changes lr (and weight decay) between steps
            for o in (opt, ref):
                o.param_groups[0]["lr"], o.param_groups[1]["lr"] = 1e-3, 5e-4
                o.param_groups[0]["weight_decay"] = 0.05
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state_fp32(p)["exp_avg"], ref.state[q]["exp_avg"])
        assert torch.equal(opt.state_fp32(p)["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
    assert opt.step_count() == 50


# ------------------------------------------------------------- precision decoupling (default)

def test_default_precision_tracks_adamw_on_least_squares():
    x, y, *init = _least_squares(seed=0, w_mag=0.1)
    ref, ref_loss = _reference(init, x, y, steps=300, lr=1e-2, weight_decay=0.01)
    weights, loss, opt = _fp8_run(init, x, y, steps=300, lr=1e-2, weight_decay=0.01)
    weight = opt.param_groups[0]["params"][0]
    assert weight.dtype == torch.float16 and weight.scale.dtype == torch.float32
    state = opt.state[weight]
    assert (state["exp_avg"].fmt, state["exp_avg_sq"].fmt) == ("e4m3", "fp16")
    dist = _rel_dist(weights, ref)
    print(f"\ndefault (m e4m3, v fp16, fp16+scale master) vs AdamW fp32: rel dist {dist:.2e}, "
          f"loss {loss:.4e} vs {ref_loss:.4e}")
    assert dist < 1e-2
    assert loss == pytest.approx(ref_loss, rel=0.03)


def test_default_precision_trains_an_mlp_like_adamw():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=gen)
    teacher = [torch.randn(64, 32, generator=gen) / 32**0.5, torch.randn(8, 64, generator=gen) / 8]
    y = torch.tanh(x @ teacher[0].T) @ teacher[1].T
    init = [torch.randn(64, 32, generator=gen) * 0.1, torch.zeros(64), torch.randn(8, 64, generator=gen) * 0.1]

    def loss_of(ws):
        return ((torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T - y) ** 2).mean()

    losses = {}
    for name in ("torch", "fp8"):
        params = _params(*init)
        if name == "torch":
            opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
        else:
            make_scaled_fp16_param(params[0])
            make_scaled_fp16_param(params[2])
            opt = FP8AdamW(params, lr=1e-2)
        for _ in range(200):
            ws = [scaled_value(p).requires_grad_() for p in params]
            loss_of(ws).backward()
            for p, w in zip(params, ws):
                hold(p, w.grad)
                if name == "torch":
                    p.grad = w.grad
            opt.step()
        losses[name] = loss_of([scaled_value(p) for p in params]).item()
    initial = loss_of(init).item()
    print(f"\nMLP, 200 steps: loss default FP8AdamW {losses['fp8']:.4e}, FP32 AdamW {losses['torch']:.4e}, "
          f"initial {initial:.4e}")
    assert losses["torch"] < 0.01 * initial
    assert losses["fp8"] == pytest.approx(losses["torch"], rel=0.05)


# ------------------------------------------------------------------- the paper's ablation

def test_ablation_fp16_master_needs_its_scale_for_small_weights():
    # Weights ~1e-5 lie in FP16's subnormal range (below 6.1e-5, spacing 6e-8) unless scaled;
    # Adam moves them by ~lr = 1e-7 a step, one or two of those spacings.
    x, y, *init = _least_squares(seed=0, w_mag=1e-5)
    ref, _ = _reference(init, x, y, steps=300, lr=1e-7)
    errors = {}
    for kind in ("scaled", "float16", "bfloat16"):
        weights, _, _ = _fp8_run(init, x, y, steps=300, lr=1e-7, weight_kind=kind, **FP32_STATES)
        errors[kind] = _rel_dist(weights, ref)
    print(f"\nmaster ablation, rel dist to FP32 AdamW after 300 steps (weights ~1e-5, lr 1e-7): "
          f"fp16+scale {errors['scaled']:.2e}, fp16 unscaled {errors['float16']:.2e}, "
          f"bf16 {errors['bfloat16']:.2e}")
    assert errors["scaled"] < 1e-2
    assert errors["float16"] > 5 * errors["scaled"]
    assert errors["bfloat16"] > 5 * errors["scaled"]


def test_ablation_fp8_second_moment_is_worse_than_fp16():
    # Input columns spanning two decades give gradients spanning two decades, v four, and more
    # as the residual shrinks: beyond E4M3's range with one scale, within FP16's.
    x, y, *init = _least_squares(seed=1, w_mag=0.1, col_decades=2.0)
    ref, ref_loss = _reference(init, x, y, steps=300, lr=1e-2)
    initial_loss = _mse(x, y, init).item()
    results = {}
    for v_dtype in ("fp16", "fp8"):
        weights, loss, _ = _fp8_run(init, x, y, steps=300, lr=1e-2, exp_avg_sq_dtype=v_dtype)
        results[v_dtype] = (_rel_dist(weights, ref), loss)
    print(f"\nsecond-moment ablation (m e4m3), rel dist / loss after 300 steps: "
          f"v fp16 {results['fp16'][0]:.2e} / {results['fp16'][1]:.2e}, "
          f"v e4m3 {results['fp8'][0]:.2e} / {results['fp8'][1]:.2e}; "
          f"FP32 AdamW loss {ref_loss:.2e}, initial {initial_loss:.2e}")
    assert results["fp16"][0] < 1e-2
    assert results["fp16"][1] == pytest.approx(ref_loss, rel=0.03)
    assert results["fp8"][0] > 100 * results["fp16"][0]
    assert results["fp8"][1] > 100 * ref_loss


def test_fp8_second_moment_warns_once_at_construction():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.warns(UserWarning, match="diverge"):
        opt = FP8AdamW([p], exp_avg_sq_dtype="fp8")
    p.grad = torch.ones(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        FP8AdamW([p])  # the default (fp16 second moment) is silent


# ------------------------------------------------------------------------ stochastic rounding

def test_step_toward_matches_nextafter():
    for dtype in (torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        values = torch.tensor([0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.smallest_normal,
                               info.smallest_normal / 4, -info.smallest_normal / 4, 3.14159, 2.0 ** -20], dtype=dtype)
        for up in (True, False):
            target = torch.full_like(values, float("inf") if up else float("-inf"))
            got = step_toward(values, torch.full(values.shape, up))
            # By value: the bit trick's zero has the direction's sign, nextafter keeps the input's.
            assert torch.equal(got.float(), torch.nextafter(values, target).float()), (dtype, up)


def test_stochastic_round_is_unbiased_between_fp16_neighbours():
    ulp = 2.0 ** -10  # FP16 spacing in [1, 2)
    deltas = torch.tensor([1e-3, -1e-3, 0.3, -0.3, 0.5, 2.7]) * ulp
    draws = 20000
    base = torch.ones(draws, deltas.numel())
    gen = torch.Generator().manual_seed(0)
    rounded = stochastic_round(base, deltas.expand_as(base), torch.float16, gen).double()
    mean_delta = rounded.mean(0) - 1.0
    # Each draw is one of two neighbours one spacing apart: std of the mean <= ulp / 2 / sqrt(draws).
    tolerance = 4 * 0.5 * ulp / draws**0.5
    assert torch.allclose(mean_delta, deltas.double(), atol=tolerance, rtol=0)
    assert set(torch.unique(rounded[:, 0]).tolist()) <= {1.0, 1.0 + ulp}
    # Saturation at the format's maximum; exact values stay exact.
    top = stochastic_round(torch.full((8,), 65504.0), torch.full((8,), 100.0), torch.float16, gen)
    assert torch.equal(top, torch.full((8,), 65504.0, dtype=torch.float16))
    exact = stochastic_round(torch.tensor([0.5, -3.0, 0.0]), torch.zeros(3), torch.float16, gen)
    assert exact.tolist() == [0.5, -3.0, 0.0]


def _tiny_update_run(*, stochastic_rounding: bool, steps: int, seed: int = 0):
    """Scaled-FP16 and BF16 masters in [0.5, 1) pushed down by ~lr = 2e-5 a step: 1/25 of the
    FP16 spacing there (2**-11), 1/200 of BF16's."""
    gen = torch.Generator().manual_seed(123)
    init = [0.5 + 0.499 * torch.rand(4096, generator=gen), 0.5 + 0.499 * torch.rand(4096, generator=gen)]
    params = _params(*init)
    make_scaled_fp16_param(params[0])
    params[1].data = params[1].data.bfloat16()
    opt = FP8AdamW(params, lr=2e-5, weight_decay=0.0, stochastic_rounding=stochastic_rounding, seed=seed,
                   **FP32_STATES)
    start = [scaled_value(p).clone() for p in params]
    for p in params:
        hold(p, torch.ones(4096))
    for _ in range(steps):
        opt.step()
    return params, start


def test_tiny_updates_are_lost_without_stochastic_rounding_and_kept_with_it():
    steps = 500
    ref = _params(torch.full((4096,), 0.75))
    ref_opt = torch.optim.AdamW(ref, lr=2e-5, weight_decay=0.0, foreach=False)
    for _ in range(steps):
        ref[0].grad = torch.ones(4096)
        ref_opt.step()
    exact_drift = (ref[0].detach() - 0.75).mean().item()  # ~ -1e-2

    params, start = _tiny_update_run(stochastic_rounding=False, steps=steps)
    for p, s in zip(params, start):
        assert torch.equal(scaled_value(p), s)  # every update rounded away

    params, start = _tiny_update_run(stochastic_rounding=True, steps=steps)
    drifts = [(scaled_value(p) - s).mean().item() for p, s in zip(params, start)]
    print(f"\nstochastic rounding, mean drift over {steps} steps: fp16+scale {drifts[0]:.5e}, "
          f"bf16 {drifts[1]:.5e}, exact fp32 {exact_drift:.5e}")
    assert drifts[0] == pytest.approx(exact_drift, rel=0.03)
    assert drifts[1] == pytest.approx(exact_drift, rel=0.05)


def test_stochastic_rounding_is_reproducible_per_seed():
    runs = [_tiny_update_run(stochastic_rounding=True, steps=20, seed=seed)[0] for seed in (7, 7, 8)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
        assert not hasattr(a, "scale") or torch.equal(a.scale, b.scale)
    assert not torch.equal(runs[0][0], runs[2][0])


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("source", ["grad", "grad_fp8", "held", "none"])
def test_gradient_sources_in_order(source):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(8, 16, generator=gen)
    candidates = {"grad": torch.randn(8, 16, generator=gen),
                  "grad_fp8": fp8.quantize(torch.randn(8, 16, generator=gen), "e4m3"),
                  "held": torch.randn(8, 16, generator=gen)}
    p = _params(init)[0]
    order = ["grad", "grad_fp8", "held"]
    present = order[order.index(source):] if source != "none" else []
    store = FP8GradStore()
    for name in present:
        if name == "grad_fp8":
            store.set(p, candidates[name])
        elif name == "held":
            hold(p, candidates[name])
        else:
            p.grad = candidates[name]
    opt = FP8AdamW([p], lr=1e-2, fp8_grads=store, **FP32_STATES)
    opt.step()
    if source == "none":
        assert torch.equal(p.detach(), init) and opt.state_fp32(p) == {}
        return
    expected_grad = candidates[source]
    if source == "grad_fp8":
        expected_grad = expected_grad.dequantize()
    q = _params(init)[0]
    q.grad = expected_grad.clone()
    torch.optim.AdamW([q], lr=1e-2, foreach=False).step()
    assert torch.equal(p.detach(), q.detach())


def test_zero_grad_drops_fp8_gradients():
    p, other = _params(torch.ones(4), torch.ones(2))
    store = FP8GradStore()
    store.set(p, fp8.quantize(torch.ones(4)))
    store.set(other, fp8.quantize(torch.ones(2)))
    p.grad = torch.ones(4)
    FP8AdamW([p], fp8_grads=store).zero_grad()
    assert p.grad is None and p not in store and other in store  # only its own parameters


# --------------------------------------------------------------------------- FP16 masters

def test_make_scaled_fp16_param_in_place():
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(64, 32, generator=gen) * 1e-4
    p = torch.nn.Parameter(value.clone())
    p.requires_grad_(False)
    same = make_scaled_fp16_param(p)
    assert same is p and not p.requires_grad and p.dtype == torch.float16
    assert type(p) is ScaledFP16Parameter and is_scaled_fp16(p)  # the kind is the type
    copied = copy.deepcopy(p)
    assert type(copied) is ScaledFP16Parameter and torch.equal(copied.scale, p.scale) and copied.scale is not p.scale
    assert p.scale.dim() == 0 and p.scale.dtype == torch.float32
    assert torch.log2(p.scale).item() == int(torch.log2(p.scale).item())  # a power of two
    assert 32752 <= p.detach().float().abs().max().item() <= 65504
    assert torch.allclose(scaled_value(p), value, rtol=2.0 ** -11, atol=0)
    assert make_scaled_fp16_param(p) is p  # already one: unchanged
    payload, scale = to_scaled_fp16(value, power_of_two=False)
    assert payload.float().abs().max().item() == 65504.0
    payload, scale = to_scaled_fp16(torch.zeros(3))
    assert scale.item() == 1.0 and not payload.any()
    q = torch.nn.Parameter(torch.ones(2))
    q.grad = torch.ones(2)
    with pytest.raises(ValueError, match="before the first backward"):
        make_scaled_fp16_param(q)
    with pytest.raises(ValueError, match="nn.Parameter"):
        make_scaled_fp16_param(torch.ones(2))
    fp16 = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    fp16.scale = torch.ones(())  # an attribute does not make a kind
    assert not is_scaled_fp16(fp16)


def test_fp16_master_rescales_when_its_range_changes():
    p = make_scaled_fp16_param(torch.nn.Parameter(torch.tensor([1.0, 0.25, -0.5])))
    scale_before = p.scale.item()
    hold(p, torch.tensor([-1.0, 0.0, 0.0]))
    opt = FP8AdamW([p], lr=1.5, weight_decay=0.0, **FP32_STATES)
    opt.step()  # the first element grows to 2.5: the scale must halve at least
    assert p.scale.item() <= scale_before / 2
    assert scaled_value(p).tolist() == pytest.approx([2.5, 0.25, -0.5], rel=1e-3)
    assert torch.isfinite(p.detach().float()).all()
    _, kept = to_scaled_fp16(torch.zeros(3), prev_scale=torch.tensor(8.0))
    assert kept.item() == 8.0  # an all-zero tensor says nothing about its range


def test_exact_formula_scales_without_power_of_two_rounding():
    p = make_scaled_fp16_param(torch.nn.Parameter(torch.tensor([0.3, -0.1, 0.2])), power_of_two=False)
    hold(p, torch.tensor([1.0, 1.0, -1.0]))
    opt = FP8AdamW([p], lr=1e-2, power_of_two_scales=False)
    opt.step()
    value = scaled_value(p)
    assert p.scale.item() == pytest.approx(65504.0 / value.abs().max().item(), rel=1e-3)
    assert p.detach().float().abs().max().item() == 65504.0
    assert value.tolist() == pytest.approx([0.29, -0.11, 0.21], rel=1e-3)
    v_fp16 = opt.state[p]["exp_avg_sq"]
    assert v_fp16.data.float().max().item() == 65504.0


# --------------------------------------------------------------------------- checkpoints

def _mixed_params(seed: int = 0, device: str = "cpu"):
    """A scaled-FP16 master, an FP32 bias and a BF16 weight."""
    gen = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(32, 16, generator=gen), torch.randn(16, generator=gen), torch.randn(8, 32, generator=gen))
    params = _params(*(t.to(device) for t in tensors))
    make_scaled_fp16_param(params[0])
    params[2].data = params[2].data.bfloat16()
    return params


def _clone_params(params):
    clones = []
    for p in params:
        if is_scaled_fp16(p):
            q = ScaledFP16Parameter.new(p.detach().clone(), p.scale.clone(), requires_grad=True)
        else:
            q = torch.nn.Parameter(p.detach().clone())
        clones.append(q)
    return clones


def _assert_same(params_a, params_b, opt_a, opt_b):
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
        assert torch.equal(getattr(a, "scale", torch.ones(())), getattr(b, "scale", torch.ones(())))
        state_a, state_b = opt_a.state_fp32(a), opt_b.state_fp32(b)
        assert all(torch.equal(state_a[k], state_b[k]) for k in ("exp_avg", "exp_avg_sq"))


def _grads(params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.device) for p in params] for _ in range(steps)]


def test_state_fp32_round_trip_continues_bit_exactly():
    params = _mixed_params()
    opt = FP8AdamW(params, lr=1e-2, weight_decay=0.1)
    assert opt.state_fp32(params[0]) == {}
    _steps(opt, params, _grads(params, 10, seed=1))
    clones = _clone_params(params)
    resumed = FP8AdamW(clones, lr=1e-2, weight_decay=0.1)
    for p, q in zip(params, clones):
        state = opt.state_fp32(p)
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == p.shape
        resumed.load_state_fp32(q, {k: v.flatten() for k, v in state.items()}, opt.step_count())
    assert resumed.step_count() == 10
    assert resumed.state[clones[0]]["exp_avg"].fmt == "e4m3"
    more = _grads(params, 10, seed=2)
    _steps(opt, params, more)
    _steps(resumed, clones, more)
    _assert_same(params, clones, opt, resumed)


def test_state_dict_round_trip_through_weights_only_load():
    params = _mixed_params()
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "stochastic_rounding": True, "seed": 3}
    opt = FP8AdamW(params, **kwargs)
    _steps(opt, params, _grads(params, 5, seed=1))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = _clone_params(params)
    resumed = FP8AdamW(clones, lr=0.5, **{k: v for k, v in kwargs.items() if k != "lr"})
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["lr"] == 1e-2
    more = _grads(params, 5, seed=2)
    _steps(opt, params, more)
    _steps(resumed, clones, more)  # includes the stochastic-rounding generator's state
    _assert_same(params, clones, opt, resumed)


def test_load_state_dict_converts_other_state_dtypes_and_checks_groups():
    params = _mixed_params()
    fp32_opt = FP8AdamW(params, **FP32_STATES)
    _steps(fp32_opt, params, _grads(params, 2, seed=1))
    default_opt = FP8AdamW(_clone_params(params))
    default_opt.load_state_dict(fp32_opt.state_dict())
    p0 = default_opt.param_groups[0]["params"][0]
    assert default_opt.state[p0]["exp_avg"].fmt == "e4m3" and default_opt.state[p0]["exp_avg_sq"].fmt == "fp16"
    assert torch.allclose(default_opt.state_fp32(p0)["exp_avg"], fp32_opt.state_fp32(params[0])["exp_avg"],
                          rtol=2.0 ** -3, atol=1e-6)
    with pytest.raises(ValueError, match="same parameters"):
        FP8AdamW(_clone_params(params)[:2]).load_state_dict(fp32_opt.state_dict())


# ------------------------------------------------------------------------------- memory

def test_state_bytes_default_is_three_bytes_per_param():
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = FP8AdamW([p])
    assert opt.state_bytes() == 0 and opt.master_bytes() == 0
    p.grad = torch.randn(1024, 1024)
    opt.step()
    numel = p.numel()
    assert opt.state_bytes() == 3 * numel + 2 * 4  # 1 (e4m3 m) + 2 (fp16 v) a param, two fp32 scales
    fp32_opt = FP8AdamW([torch.nn.Parameter(torch.zeros(10))], **FP32_STATES)
    fp32_opt.init_states()
    assert fp32_opt.state_bytes() == 8 * 10
    bf16_opt = FP8AdamW([torch.nn.Parameter(torch.zeros(10))], exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16")
    bf16_opt.init_states()
    assert bf16_opt.state_bytes() == 4 * 10


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, match", [
    ({"exp_avg_dtype": "fp4"}, "exp_avg_dtype='fp4'.*fp32, bf16, fp16, fp8"),
    ({"exp_avg_sq_dtype": "e4m3"}, "exp_avg_sq_dtype"),
    ({"lr": -1e-3}, "lr must be"),
    ({"betas": (1.0, 0.9)}, "betas"),
    ({"betas": (0.9, -0.1)}, "betas"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FP8AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_params_raise_value_error():
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        FP8AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="lr must be"):
        FP8AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0}])
    bad = make_scaled_fp16_param(torch.nn.Parameter(torch.zeros(2)))
    bad.scale = torch.ones(2)
    with pytest.raises(ValueError, match="0-dim float32"):
        FP8AdamW([bad])


# ------------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_matches_torch_and_round_trips():
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(64, 32, generator=gen)
    grads = [torch.randn(64, 32, generator=gen) for _ in range(20)]
    ours, theirs = _params(init.to(device)), _params(init.to(device))
    opt = FP8AdamW(ours, lr=1e-2, weight_decay=0.1, **FP32_STATES)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for g in grads:
        ours[0].grad, theirs[0].grad = g.to(device), g.to(device)
        opt.step()
        ref.step()
    assert torch.equal(ours[0], theirs[0])  # the same kernels in the same order

    params = _mixed_params(device="cuda")
    assert params[0].scale.device == params[0].device
    opt = FP8AdamW(params, lr=1e-2, stochastic_rounding=True, seed=5)
    _steps(opt, params, _grads(params, 3, seed=1))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = _clone_params(params)
    resumed = FP8AdamW(clones, lr=1e-2, stochastic_rounding=True, seed=5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    more = _grads(params, 3, seed=2)
    _steps(opt, params, more)
    _steps(resumed, clones, more)
    _assert_same(params, clones, opt, resumed)
