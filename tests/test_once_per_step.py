"""What the trainer does once per step instead of once per use (`apply_precision(...,
once_per_step=True)` with `end_step()` after each optimizer update): each FP8 linear casts its
weight once per step and shares the copy among the step's micro-batches, forward and backward, to
the bit what a cast per use gives; delayed scaling records one history row per step; and a
`ScalingTensor` takes its scale's reciprocal once per value of the scale."""

from __future__ import annotations

import pytest
import torch

import fp8
from fp8.linear import FP8LinearState
from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.factory import build_optimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.precision import FP8Config, apply_precision
from megatron.core.transformer.config import TransformerConfig

VOCAB, SEQ, MICRO, STEPS = 64, 16, 3, 3


def build(level: str, recipe: str, once_per_step: bool):
    ps = ParallelState.build(1, 1)
    config = TransformerConfig(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=VOCAB,
                               max_position_embeddings=SEQ, ffn_hidden_size=256, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=5)
    precision = apply_precision(model, FP8Config(level=level, recipe=recipe, min_features=64), ps,
                                once_per_step=once_per_step)
    ddp = DistributedDataParallel(model, ps, precision=precision)
    optimizer = build_optimizer(list(model.named_parameters()), OptimizerConfig(lr=1e-3, weight_decay=0.1), ps,
                                ddp, precision, use_distributed_optimizer=False)
    return model, ddp, optimizer, precision


def train(level: str, recipe: str, once_per_step: bool, monkeypatch):
    """STEPS steps of MICRO micro-batches; returns losses, weights' bytes, weight casts per step."""
    model, ddp, optimizer, precision = build(level, recipe, once_per_step)
    casts = []
    original = FP8LinearState.cast

    def counted(self, x2d, role, transport=None):
        casts.append(role)
        return original(self, x2d, role, transport)

    monkeypatch.setattr(FP8LinearState, "cast", counted)
    gen = torch.Generator().manual_seed(7)
    losses, weight_casts = [], []
    for _ in range(STEPS):
        casts.clear()
        ddp.zero_grad_buffer()
        for _ in range(MICRO):
            tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
            loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean() / MICRO
            loss.backward()
            losses.append(loss.item())
        ddp.finish_grad_sync()
        optimizer.step()
        if once_per_step:
            precision.end_step()
        weight_casts.append(casts.count("weight"))
    weights = [p.detach().clone() for p in model.parameters()]
    kernels = [m.kernel for m in model.modules() if isinstance(getattr(m, "kernel", None), FP8LinearState)]
    return losses, weights, weight_casts, precision, kernels


@pytest.mark.parametrize("level", ["O0", "O1", "O2"])
def test_one_weight_cast_per_step_gives_the_bits_of_a_cast_per_use(level, monkeypatch):
    """From O1 a weight is cast once per step; O0 (BF16 weights and gradients, whose memory the
    copies would raise above BF16's) casts it at every use. The same bits either way."""
    losses, weights, casts, precision, _ = train(level, "current", True, monkeypatch)
    ref_losses, ref_weights, ref_casts, _, _ = train(level, "current", False, monkeypatch)
    linears = len(precision.fp8_linears)
    per_use = [2 * MICRO * linears] * STEPS  # forward and backward of every micro-batch
    assert linears == 8 and casts == ([linears] * STEPS if level != "O0" else per_use)
    assert ref_casts == per_use
    assert losses == ref_losses
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(weights, ref_weights))
    # Nothing outlives the step: the copies are dropped with the update.
    assert all(not kernel._weight_copies for kernel in precision.kernels)


def test_delayed_scaling_records_one_row_per_step(monkeypatch):
    """Once per step: a history row per step for every linear's input and output gradient; per
    use (loops that call no `end_step`): a row per cast."""
    _, _, _, per_step, kernels = train("O2", "delayed", True, monkeypatch)
    _, _, _, per_cast, lone = train("O2", "delayed", False, monkeypatch)
    assert per_step.scalings is not None and len(per_step.scalings) == 2 * 8  # input and grad_output
    assert per_cast.scalings is None and len(lone) == 8
    for kernel in kernels:
        assert [kernel.scalers[role].num_recorded for role in ("input", "grad_output")] == [STEPS, STEPS]
        assert kernel.scalers["input"].pending is None
    for kernel in lone:
        assert [kernel.scalers[role].num_recorded for role in ("input", "grad_output")] == [STEPS * MICRO] * 2


def test_a_scale_reciprocal_is_taken_once_per_value_of_the_scale():
    x = fp8.quantize(torch.randn(32, 16), "e4m3")
    first = x.scale_inv()
    assert x.scale_inv() is first and x.t().scale_inv() is first and x.reshape(16, 32).scale_inv() is first
    assert torch.equal(first, x.scale.reciprocal())
    x.scale.mul_(2)  # as gradient clipping does to an FP8 gradient's scale
    again = x.scale_inv()
    assert again is not first and torch.equal(again, x.scale.reciprocal())
    assert x.t().scale_inv() is again
