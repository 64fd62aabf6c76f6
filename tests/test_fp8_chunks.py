"""FP8 optimizer work in bounded chunks: a step, the O3 weight publication and the micro-batch
accumulation of FP8 gradients, taken a few values at a time, give the bits of the whole-tensor
formulas."""

from __future__ import annotations

import pytest
import torch

import fp8
from fp8.optim import make_scaled_fp16_param, scaled_value
from fp8_optim_support import FP32_STATES, FP8AdamW, no_held_gradients  # noqa: F401 (fixture)
from fp8_optim_support import params_of as _params
from fp8_optim_support import take_steps as _steps


@pytest.mark.parametrize("states", [FP32_STATES, {"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp16"},
                                    {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"}])
@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_steps_in_chunks_of_any_size_are_bit_identical(states, stochastic_rounding):
    """A step taken 7 or 100 values at a time equals one taken whole: weights, scales and moments,
    for FP32, BF16 and scaled FP16 weights (whose new scale needs every chunk's amax first)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(33, 21, generator=gen), torch.randn(50, generator=gen), torch.randn(4, 9, generator=gen)]
    grads = [[torch.randn_like(x) * 10.0 ** -k for x in init] for k in range(3)]
    runs = []
    for chunk in (7, 100, 1 << 30):
        params = _params(*init)
        make_scaled_fp16_param(params[0])
        params[1].data = params[1].data.bfloat16()
        opt = FP8AdamW(params, lr=1e-2, weight_decay=0.1, stochastic_rounding=stochastic_rounding, seed=4,
                       chunk_numel=chunk, **states)
        _steps(opt, params, grads)
        runs.append(([p.detach().clone() for p in params], params[0].scale.clone(),
                     [{k: v.clone() for k, v in opt.state_fp32(p).items()} for p in params]))
    for weights, scale, moments in runs[:-1]:
        assert all(torch.equal(a, b) for a, b in zip(weights, runs[-1][0]))
        assert torch.equal(scale, runs[-1][1])
        for mine, whole in zip(moments, runs[-1][2]):
            assert all(torch.equal(mine[k], whole[k]) for k in whole)
    with pytest.raises(ValueError, match="chunk_numel"):
        FP8AdamW(_params(init[1]), chunk_numel=0)


def test_chunked_casts_equal_whole_tensor_casts():
    """The O3 weight publication and the micro-batch accumulation of FP8 gradients, in chunks of
    7 values, give the bytes and scales of the whole-tensor formulas."""
    from fp8.params import WeightCast, fp8_weight_from_master, quantize_fp8_weight
    from fp8.tensor import accumulate, quantize
    gen = torch.Generator().manual_seed(5)
    value = torch.randn(37, 11, generator=gen) * 3
    master = make_scaled_fp16_param(torch.nn.Parameter(value.clone()))
    for cast in (WeightCast(0, False), WeightCast(2, True)):
        prev = torch.tensor(4.0)
        payload, scale = fp8_weight_from_master(master, cast, prev, chunk_numel=7)
        want_payload, want_scale = quantize_fp8_weight(scaled_value(master), cast, prev)
        assert torch.equal(payload.view(torch.uint8), want_payload.view(torch.uint8)) and torch.equal(scale, want_scale)
    acc_in = quantize(torch.randn(37, 11, generator=gen), "e4m3")
    x = torch.randn(37, 11, generator=gen) * 100
    x[3, 4] = float("inf")  # an overflow must still reach the optimizer as NaN
    for x_in in (x[:, :], torch.randn(37, 11, generator=gen)):
        want = quantize(acc_in.dequantize() + x_in.float(), "e4m3", inf_to_nan=True)
        got = accumulate(fp8.ScalingTensor(acc_in.data.clone(), acc_in.scale.clone(), "e4m3"), x_in, chunk_numel=7)
        assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(got.scale, want.scale)
