"""FP8Linear: outputs and all three gradients against float64, what it saves, FP8 weight
gradients, the size filter, and a small MLP trained to the FP32 loss."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8

RECIPES = ["delayed", "current", "rowwise", "blockwise"]


def reference_grads(lin, x, dy):
    x64 = x.detach().double().requires_grad_()
    w64 = lin.weight.detach().double().requires_grad_()
    b64 = lin.bias.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, b64)
    y64.backward(dy.double())
    return y64, x64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_and_gradients_against_float64(recipe, fmt):
    torch.manual_seed(0)
    lin = fp8.FP8Linear(256, 384, recipe=fp8.Recipe(recipe=recipe, fmt=fmt))
    assert lin.use_fp8
    x = torch.randn(4, 64, 256, requires_grad=True)
    dy = torch.randn(4, 64, 384)
    for _ in range(2):  # the second step runs delayed scaling from its history
        x.grad = None
        lin.weight.grad = lin.bias.grad = None
        y = lin(x)
        y.backward(dy)
    y64, dx64, dw64, db64 = reference_grads(lin, x, dy)
    grad_db = 22 if fmt == "hybrid" else 26  # E5M2 has one mantissa bit fewer
    assert y.shape == y64.shape and y.dtype == torch.float32
    assert fp8.sqnr_db(y64, y) > 26
    assert fp8.sqnr_db(dx64, x.grad) > grad_db
    assert fp8.sqnr_db(dw64, lin.weight.grad) > grad_db
    assert fp8.sqnr_db(db64, lin.bias.grad) > 100  # bias gradient stays high precision
    # And FP8 is really used: the result is not the high-precision one.
    assert fp8.sqnr_db(y64, y) < 45


def test_only_the_fp8_input_is_saved_for_backward():
    """The FP8 input is kept for backward; the FP8 weight is cast again there, not kept."""
    lin = fp8.FP8Linear(256, 256, recipe=fp8.Recipe(recipe="current"))
    x = torch.randn(32, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    y.sum().backward()
    payloads = [t for t in saved if t.numel() > 1]
    assert {t.dtype for t in payloads} == {torch.float8_e4m3fn}
    assert sorted(t.numel() for t in payloads) == [32 * 256]
    assert all(t.dtype == torch.float32 and t.numel() == 1 for t in saved if t.numel() == 1)


def test_backward_uses_e5m2_for_hybrid_gradients(monkeypatch):
    lin = fp8.FP8Linear(128, 128, recipe=fp8.Recipe(recipe="current", fmt="hybrid"))
    seen = []
    original = fp8.linear.fp8_matmul

    def spy(a, b, *args, **kwargs):
        seen.append((a.fmt, b.fmt))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(fp8.linear, "fp8_matmul", spy)
    x = torch.randn(16, 128, requires_grad=True)
    lin(x).sum().backward()
    assert seen == [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e5m2", "e4m3")]


def test_fp8_weight_gradient_accumulates_across_micro_batches():
    torch.manual_seed(0)
    lin = fp8.FP8Linear(128, 256, recipe=fp8.Recipe(recipe="current"), fp8_wgrad=True)
    ref = fp8.FP8Linear(128, 256, recipe=fp8.Recipe(recipe="current"))
    ref.load_state_dict(lin.state_dict())
    micro_batches = [torch.randn(32, 128) * (i + 1) for i in range(3)]
    for x in micro_batches:
        lin(x).square().sum().backward()
        ref(x).square().sum().backward()
    assert lin.weight.grad is None
    grad_fp8 = lin.fp8.grads.get(lin.weight)  # the layer's FP8 gradient store, not an attribute
    assert not hasattr(lin.weight, "grad_fp8")
    assert isinstance(grad_fp8, fp8.ScalingTensor) and grad_fp8.fmt == "e4m3" and grad_fp8.tile is None
    assert fp8.sqnr_db(ref.weight.grad, grad_fp8.dequantize()) > 25
    # Exact float64 sum of the three micro-batch gradients as the other reference.
    w64 = lin.weight.detach().double().requires_grad_()
    for x in micro_batches:
        F.linear(x.double(), w64, lin.bias.detach().double()).square().sum().backward()
    assert fp8.sqnr_db(w64.grad, grad_fp8.dequantize()) > 20
    assert lin.bias.grad is not None  # biases keep ordinary gradients


def test_size_filter_keeps_small_gemms_in_high_precision():
    recipe = fp8.Recipe(recipe="current", min_features=128)
    small = fp8.FP8Linear(64, 256, recipe=recipe)
    odd = fp8.FP8Linear(200, 256, recipe=recipe)
    assert not small.use_fp8 and not odd.use_fp8
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    out = small(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, small.weight.bfloat16(), small.bias.bfloat16()))
    assert fp8.FP8Linear(128, 256, recipe=recipe).use_fp8


def test_weight_is_cast_from_its_current_value_each_time():
    # Even under the delayed recipe the weight is scaled from its current value: it is all
    # there at cast time, and a stale scale would clip a weight that grew. Casting it again
    # (backward does, rather than keep the copy) gives the same bytes.
    lin = fp8.FP8Linear(128, 128, recipe=fp8.Recipe(recipe="delayed"))
    first, again = lin.fp8_weight(), lin.fp8_weight()
    assert again is not first and torch.equal(again.data.view(torch.uint8), first.data.view(torch.uint8))
    assert torch.equal(again.scale, first.scale)
    with torch.no_grad():
        lin.weight.mul_(2)
    second = lin.fp8_weight()
    assert torch.equal(second.scale, first.scale / 2)
    torch.testing.assert_close(second.dequantize(), lin.weight.detach(), rtol=0.07, atol=0)


def test_from_linear_shares_parameters():
    base = nn.Linear(128, 256)
    lin = fp8.FP8Linear.from_linear(base, fp8.Recipe(recipe="current"))
    assert lin.weight is base.weight and lin.bias is base.bias
    x = torch.randn(4, 128)
    assert fp8.sqnr_db(base(x), lin(x)) > 25


def test_bf16_activations():
    lin = fp8.FP8Linear(128, 128, recipe=fp8.Recipe(recipe="current"))
    x = torch.randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert lin.weight.grad.dtype == torch.float32


def make_task(seed=0, n=2048, dim=128):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, dim, generator=g) / dim**0.5
    x = torch.randn(n, dim, generator=g)
    y = torch.tanh(x @ teacher) @ teacher.t()
    return x, y


def train_mlp(linear_factory, steps=150, seed=0):
    torch.manual_seed(seed)
    x, y = make_task()
    model = nn.Sequential(linear_factory(128, 256), nn.GELU(), linear_factory(256, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % x.shape[0]
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        return F.mse_loss(model(x), y).item(), losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_mlp_trains_to_the_fp32_loss(recipe):
    # Same seed per layer shape, so both runs start from the same weights.
    def fp8_linear(i, o):
        torch.manual_seed(i * 1000 + o)
        return fp8.FP8Linear(i, o, recipe=fp8.Recipe(recipe=recipe, fmt="hybrid"))

    def fp32_linear(i, o):
        torch.manual_seed(i * 1000 + o)
        return nn.Linear(i, o)

    fp32_loss, first = train_mlp(fp32_linear)
    fp8_loss, _ = train_mlp(fp8_linear)
    assert fp32_loss < 0.2 * first  # the task is learnt ...
    assert abs(fp8_loss - fp32_loss) / fp32_loss < 0.05  # ... and FP8 lands within 5% of FP32


def test_delayed_scaling_history_travels_in_the_state_dict():
    torch.manual_seed(0)
    recipe = fp8.Recipe(recipe="delayed", amax_history_len=4)
    lin = fp8.FP8Linear(128, 128, recipe=recipe)
    for scale in (1.0, 3.0):
        lin(torch.randn(8, 128) * scale).sum().backward()
    state = lin.state_dict()
    assert state["_extra_state"]["input"]["num_recorded"] == 2
    fresh = fp8.FP8Linear(128, 128, recipe=recipe)
    fresh.load_state_dict(state)
    x = torch.randn(8, 128) * 0.1  # far below the history: the delayed scale differs from a fresh one
    assert torch.equal(fresh(x), lin(x))
    no_history = fp8.FP8Linear(128, 128, recipe=recipe)
    no_history.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"}, strict=False)
    assert not torch.equal(no_history(x), lin(x))
