"""Vocab-parallel cross-entropy against F.cross_entropy on the gathered logits: loss and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

SEQ, BATCH, VOCAB = 5, 3, 16
SMOOTHINGS = (0.0, 0.1)


def _problem(offset: float = 0.0):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=generator) * 3 + offset
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
    target[0, :] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2])[:BATCH]  # both sides of the shard edge
    target[1, 0] = VOCAB - 1
    loss_weights = torch.rand(SEQ, BATCH, generator=generator)
    return logits, target, loss_weights


def _reference(logits, target, loss_weights, label_smoothing):
    logits = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), reduction="none",
                           label_smoothing=label_smoothing).view(target.shape)
    (loss * loss_weights).sum().backward()
    return loss.detach(), logits.grad


def _parallel(logits_full, target, loss_weights, ps, label_smoothing):
    logits = logits_full.chunk(ps.tp_size, dim=-1)[ps.tp_rank].detach().clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, target, ps, label_smoothing=label_smoothing)
    (loss * loss_weights).sum().backward()
    return loss.detach(), logits.grad


def _ce_worker(rank, world_size):
    ps = ParallelState.build(tensor_model_parallel_size=world_size)
    out = {}
    for smoothing in SMOOTHINGS:
        before = ps.counter.snapshot()
        out[smoothing] = _parallel(*_problem(), ps, smoothing)
        out[f"{smoothing}:bytes"] = ps.counter.since(before)["tp_bytes"]
    out["large"] = _parallel(*_problem(offset=1e4), ps, 0.0)
    logits, target, weights = _problem()
    out["bf16"] = _parallel(logits.bfloat16(), target, weights, ps, 0.1)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_ce_worker, 2)


@pytest.mark.distributed
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_loss_and_grad_match_cross_entropy(two_ranks, smoothing):
    expected_loss, expected_grad = _reference(*_problem(), smoothing)
    for rank, out in enumerate(two_ranks):
        loss, grad = out[smoothing]
        assert loss.shape == (SEQ, BATCH)
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(grad, expected_grad.chunk(2, dim=-1)[rank])
        # max (fp32 per token) + one fused all-reduce of two (three with smoothing) fp32 per token,
        # each all-reduce 2 * 1/2 * S.
        assert out[f"{smoothing}:bytes"] == SEQ * BATCH * 4 * (1 + 2 + (smoothing > 0))


@pytest.mark.distributed
def test_large_logits_stay_finite_and_bf16_is_close(two_ranks):
    expected_loss, expected_grad = _reference(*_problem(offset=1e4), 0.0)
    bf16_loss, bf16_grad = _reference(_problem()[0].bfloat16().float(), *_problem()[1:], 0.1)
    for rank, out in enumerate(two_ranks):
        loss, grad = out["large"]
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=2e-3)
        torch.testing.assert_close(grad, expected_grad.chunk(2, dim=-1)[rank], rtol=1e-4, atol=1e-3)
        loss, grad = out["bf16"]
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss, bf16_loss)
        torch.testing.assert_close(grad.float(), bf16_grad.chunk(2, dim=-1)[rank], rtol=2e-2, atol=2e-3)


def test_single_process_matches_and_gradchecks():
    ps = ParallelState.single("cpu")
    for smoothing in SMOOTHINGS:
        expected_loss, expected_grad = _reference(*_problem(), smoothing)
        loss, grad = _parallel(*_problem(), ps, smoothing)
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(grad, expected_grad)
    logits = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (3, 2))
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_cross_entropy(z, target, ps, 0.2), (logits,))


def test_bad_arguments_name_the_fix():
    ps = ParallelState.single("cpu")
    with pytest.raises(ValueError, match="label smoothing must be in"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), ps, 1.0)
    with pytest.raises(ValueError, match="plus a vocabulary dimension"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), ps)
