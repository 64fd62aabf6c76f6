"""RLHF objectives (rlhf.losses) against hand computations on small float64 tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import (
    AdaptiveKLController, bradley_terry_loss, dpo_loss, entropy, gae, group_relative_advantages,
    kl_penalized_rewards, ppo_policy_loss, ppo_value_loss, sequence_logprobs, whiten,
)

D = torch.float64


def t(*values):
    return torch.tensor(values, dtype=D)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry():
    loss, accuracy = bradley_terry_loss(t(1.0, 0.5, -1.0), t(0.0, 1.5, -3.0))
    want = -(math.log(sig(1.0)) + math.log(sig(-1.0)) + math.log(sig(2.0))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12) and accuracy.item() == pytest.approx(2 / 3)


def test_dpo_with_and_without_label_smoothing():
    pc, pr, rc, rr, beta = t(-3.0, -5.0), t(-4.0, -4.5), t(-3.5, -5.0), t(-3.8, -4.0), 0.1
    logits = [beta * ((-3.0 + 3.5) - (-4.0 + 3.8)), beta * ((-5.0 + 5.0) - (-4.5 + 4.0))]
    out = dpo_loss(pc, pr, rc, rr, beta)
    assert out["loss"].item() == pytest.approx(-sum(math.log(sig(x)) for x in logits) / 2, rel=1e-12)
    assert out["reward_margin"].item() == pytest.approx(sum(logits) / 2, rel=1e-12)
    assert out["accuracy"].item() == 1.0
    assert out["chosen_reward"].item() == pytest.approx(beta * (0.5 + 0.0) / 2, rel=1e-12)
    smoothed = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.2)["loss"].item()
    want = sum(-0.8 * math.log(sig(x)) - 0.2 * math.log(sig(-x)) for x in logits) / 2
    assert smoothed == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="label-smoothing"):
        dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.5)


def test_sequence_logprobs_sum_the_response_tokens():
    logits = torch.randn(2, 3, 5, dtype=D, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 4, 0], [2, 2, 3]])
    mask = t(1, 1, 0), t(0, 1, 1)
    got = sequence_logprobs(logits, labels, torch.stack(mask))
    logp = torch.log_softmax(logits, -1)
    assert got[0].item() == pytest.approx((logp[0, 0, 1] + logp[0, 1, 4]).item(), rel=1e-12)
    assert got[1].item() == pytest.approx((logp[1, 1, 2] + logp[1, 2, 3]).item(), rel=1e-12)


def test_kl_penalty_and_final_reward():
    logprobs, reference = t(-1.0, -2.0, -0.5, -9.0)[None], t(-1.5, -1.0, -0.5, -1.0)[None]
    mask = t(1, 1, 1, 0)[None]
    got = kl_penalized_rewards(t(2.0), logprobs, reference, mask, kl_coef=0.1)
    assert got[0].tolist() == pytest.approx([-0.05, 0.1, 2.0, 0.0], abs=1e-12)


def test_gae_by_hand():
    rewards, values = t(0.0, 0.0, 1.0, 5.0)[None], t(0.5, 0.4, 0.3, 9.0)[None]
    mask = t(1, 1, 1, 0)[None]
    gamma, lam = 0.9, 0.8
    # backwards over the three response tokens; the value after the last is 0
    d2 = 1.0 + 0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0], abs=1e-12)
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0], abs=1e-12)


def test_whiten():
    x, mask = t(1.0, 2.0, 3.0, 100.0), t(1, 1, 1, 0)
    got = whiten(x, mask)
    assert got.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)  # unbiased variance of 1, 2, 3 is 1
    assert whiten(x, mask, shift_mean=False).tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_clipped_policy_and_value_losses():
    old, new = t(-1.0, -1.0, -1.0), t(-1.0 + math.log(1.5), -1.0 + math.log(0.5), -1.0)
    advantages, mask, clip = t(1.0, -2.0, 3.0), t(1, 1, 1), 0.2
    loss, clipfrac = ppo_policy_loss(new[None], old[None], advantages[None], mask[None], clip)
    # token 0: ratio 1.5, A>0: max(-1.5, -1.2) = -1.2 (clipped); token 1: ratio 0.5, A<0:
    # max(1.0, 1.6) = 1.6 (clipped); token 2: ratio 1: -3
    assert loss.item() == pytest.approx((-1.2 + 1.6 - 3.0) / 3, rel=1e-12)
    assert clipfrac.item() == pytest.approx(2 / 3)
    values, old_values, returns = t(1.0, 0.0), t(0.5, 0.0), t(2.0, 1.0)
    value_loss = ppo_value_loss(values[None], old_values[None], returns[None], t(1, 1)[None], clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 1.69; token 1: 1 and 1 -> 1
    assert value_loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, rel=1e-12)


def test_entropy_and_adaptive_kl():
    logits = torch.log(t(0.5, 0.25, 0.25))[None, None]
    assert entropy(logits, t(1)[None]).item() == pytest.approx(1.5 * math.log(2), rel=1e-12)
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert controller.update(9.0, steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped to 0.2
    assert controller.update(5.4, steps=10) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    assert AdaptiveKLController(0.3).update(100.0, 50) == 0.3  # fixed
    with pytest.raises(ValueError):
        AdaptiveKLController(-1.0)


def test_group_relative_advantages():
    rewards = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0)
    got = group_relative_advantages(rewards, group_size=3, eps=0.0)
    std1 = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    std2 = math.sqrt(((1 - 5 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    want = [(1 - 1 / 3) / std1, -1 / 3 / std1, -1 / 3 / std1, (1 - 5 / 3) / std2, (1 / 3) / std2, (1 / 3) / std2]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert group_relative_advantages(t(4.0, 4.0), 2).tolist() == [0.0, 0.0]  # a group of equal rewards
    with pytest.raises(ValueError, match="groups of 4"):
        group_relative_advantages(rewards, 4)
