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


# ----- activation and weight casts, CPU GEMM blocks ---------------------------------------------
def _whole_quantize(x, fmt, tile, inf_to_nan):
    """The cast as one whole-tensor formula (amax of all of |x|, one multiply, one cast)."""
    from fp8.scaling import compute_scale, expand_tiles
    from fp8.tensor import _shape2d, cast_saturate

    spec = fp8.get_spec(fmt)
    x2d = x.reshape(_shape2d(x.shape)).float()
    if tile is None:
        amax = x2d.abs().amax()
    else:
        rows, cols = x2d.shape
        nr, nc = -(-rows // tile[0]), -(-cols // tile[1])
        padded = torch.nn.functional.pad(x2d.abs(), (0, nc * tile[1] - cols, 0, nr * tile[0] - rows))
        amax = padded.reshape(nr, tile[0], nc, tile[1]).amax(dim=(1, 3))
    scale = compute_scale(amax, spec.max)
    return cast_saturate(x2d * expand_tiles(scale, x2d.shape, tile), spec, inf_to_nan).reshape(x.shape), scale


@pytest.mark.parametrize("tile", [None, (1, 37), (1, 16), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_casts_in_chunks_of_rows_are_bit_identical(tile, dtype):
    """Casting a bounded number of rows at a time (whole tiles each, ragged edges included) gives
    the payload and scales of the whole-tensor cast, infinities and NaN included."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 45, 37, generator=gen) * torch.logspace(-3, 3, 37)).to(dtype)
    x[1, 7, 3], x[2, 40, 0] = float("inf"), float("-inf")
    x[0, 0, 5] = 3e4
    for inf_to_nan in (False, True):
        want, want_scale = _whole_quantize(x, "e4m3", tile, inf_to_nan)
        for chunk in (1, 40, 37 * 16 + 5, 1 << 30):
            got = fp8.quantize(x, "e4m3", tile=tile, inf_to_nan=inf_to_nan, chunk_numel=chunk)
            assert torch.equal(got.scale, want_scale), (tile, chunk)
            assert torch.equal(got.data.view(torch.uint8), want.view(torch.uint8)), (tile, chunk, inf_to_nan)
    with_nan = x.clone()
    with_nan[2, 44, 36] = float("nan")
    assert torch.isnan(fp8.scaling.tile_amax(with_nan.reshape(-1, 37), None, chunk_numel=40))


def test_cpu_gemm_in_blocks_matches_float64():
    """The CPU FP8 GEMM runs on blocks of rows and columns (so its FP32 operand copies stay
    bounded). Every block is placed right: the product matches the float64 one to FP32 rounding
    for any block size (ragged edges included), with and without bias; one block is one
    `torch._scaled_mm` call. (Whether blocks give one call's bits is the CPU kernel's business:
    on the machines tried they do for blocks of 256 and more; bench/memory.py's model uses such.)"""
    from fp8.gemm import _cpu_blocks, fp8_matmul

    gen = torch.Generator().manual_seed(6)
    a = fp8.quantize(torch.randn(300, 96, generator=gen), "e4m3")
    b = fp8.quantize(torch.randn(200, 96, generator=gen), "e4m3").t()
    bias = torch.randn(200, generator=gen).bfloat16()
    exact = a.dequantize(torch.float64) @ b.dequantize(torch.float64)
    for out_dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7)):
        one = torch._scaled_mm(a.data, b.data, scale_a=a.scale_inv(), scale_b=b.scale_inv(), out_dtype=out_dtype)
        assert torch.equal(fp8_matmul(a, b, out_dtype=out_dtype), one)
        assert torch.equal(fp8_matmul(a, b, out_dtype=out_dtype, bias=bias), one + bias.to(out_dtype))

        def gemm(x, y):
            return torch._scaled_mm(x, y, scale_a=a.scale_inv(), scale_b=b.scale_inv(), out_dtype=out_dtype)
        assert torch.equal(_cpu_blocks(gemm, a.data, b.data, out_dtype, chunk_numel=1 << 30), one)
        for chunk in (96 * 7, 96 * 64, 96 * 250):
            got = _cpu_blocks(gemm, a.data, b.data, out_dtype, chunk_numel=chunk).double()
            torch.testing.assert_close(got, exact, rtol=rtol, atol=rtol * exact.abs().max().item() * 1e-2)


def test_fp8_linear_bias_and_weight_gradients_round_once():
    """The FP8 linear's bias gradient (a BF16 sum) and its weight gradient written in BF16 equal
    the FP32 sum and the FP32 GEMM rounded once to BF16."""
    from fp8.gemm import fp8_matmul
    from fp8.linear import FP8LinearState

    gen = torch.Generator().manual_seed(7)
    dy = (torch.randn(333, 64, generator=gen) * 5).bfloat16()
    assert torch.equal(FP8LinearState.bias_grad(dy), dy.float().sum(0).bfloat16())
    state = FP8LinearState()
    weight = torch.nn.Parameter(torch.randn(64, 48, generator=gen).bfloat16())
    dy8, x8 = state.cast(dy, "grad_output"), state.cast(torch.randn(333, 48, generator=gen).bfloat16(), "input")
    want = fp8_matmul(dy8.t(), x8, out_dtype=torch.float32).bfloat16()
    assert torch.equal(state.wgrad(weight, dy8, x8), want)


def _train_o2(flags: list[str], corpus, steps: int = 2):
    """`steps` steps of gpt-tiny at O2 in this process; returns (losses, parameters, the chunk)."""
    from pathlib import Path

    from megatron.core.tokenizers.tokenizer import build_tokenizer
    from megatron.training.config import parse_config
    from megatron.training.gpt_providers import gpt_task
    from megatron.training.training import Trainer, setup_parallel

    repo = Path(__file__).resolve().parent.parent
    config, ps = setup_parallel(parse_config([
        "--config", str(repo / "configs" / "gpt-tiny.yaml"), "--device", "cpu", "--train-iters", str(steps),
        "--lr-warmup-iters", "1", "--eval-iters", "0", "--num-workers", "0", "--fp8-level", "O2",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64",
        "--max-position-embeddings", "64", *corpus.training_args(), *flags]))
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
    trainer = Trainer(config, ps, gpt_task(config, ps, vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod))
    try:
        chunk = fp8.scaling.default_chunk_numel()
        losses = [trainer.train_step()[0] for _ in range(steps)]
        params = [p.detach().clone() for p in trainer.model.parameters()]
    finally:
        trainer.close()
    return losses, params, chunk


def test_fp8_chunk_mb_sets_the_chunk_and_changes_no_bit(builtin_corpus_small, monkeypatch):
    """`--fp8-chunk-mb`: the trainer sets the chunk from it (auto: 4 MiB of FP32 values on a CPU),
    and O2 training with chunks of 262 values (every cast, accumulation and optimizer step of the
    FP8 weights in many pieces) gives the losses and weights of whole-tensor chunks, to the bit."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    before = fp8.scaling.default_chunk_numel()
    try:
        whole_losses, whole, chunk = _train_o2([], builtin_corpus_small)
        assert chunk == fp8.scaling.DEFAULT_CHUNK_MB * (1 << 20) // 4
        small_losses, small, chunk = _train_o2(["--fp8-chunk-mb", "0.001"], builtin_corpus_small)
        assert chunk == 262
    finally:
        fp8.scaling.set_chunk_mb(before * 4 / (1 << 20))
    assert small_losses == whole_losses
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(small, whole))


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_fp8_chunk_mb_refuses_what_is_not_a_size(value):
    from megatron.training.config import parse_config

    with pytest.raises(ValueError, match="--fp8-chunk-mb must be a positive number of MiB"):
        parse_config(["--fp8-chunk-mb", value])
    with pytest.raises(ValueError, match="--fp8-chunk-mb must be a positive number of MiB"):
        fp8.scaling.set_chunk_mb(float(value))
