"""The objectives of RLHF, on plain tensors: the pieces that the RLHF entry points put together.

Shapes: `[batch, tokens]` per-token tensors over the response tokens, with a `mask` (1 for a
response token, 0 for padding after it); per-sequence tensors are `[batch]`. Everything is computed
in the inputs' dtype (pass float32 or float64); nothing here depends on the model or its layout.

- Reward models: `bradley_terry_loss` (InstructGPT's pairwise loss).
- DPO: `sequence_logprobs`, `dpo_loss` (Rafailov et al. 2023; label smoothing as in "conservative
  DPO").
- PPO (InstructGPT / DeepSpeed-Chat): `kl_penalized_rewards` (the reward at the last response token,
  a per-token KL penalty to the reference everywhere), `gae` (Schulman et al. 2016), `whiten`,
  `ppo_policy_loss` and `ppo_value_loss` (clipped), `AdaptiveKLController` (Ziegler et al. 2019),
  `entropy`.
- GRPO (Shao et al. 2024): `group_relative_advantages`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.pipeline_parallel.token_loss import token_mean


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# ----- reward models ----------------------------------------------------------------------------
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of -log sigmoid(r_chosen - r_rejected), fraction of pairs with r_chosen > r_rejected)."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, (chosen > rejected).to(chosen.dtype).mean()


# ----- DPO ----------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per token: `logits` [b, s, V], `labels` [b, s] -> [b, s]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities per sequence: [b]."""
    return (token_logprobs(logits, labels) * mask.to(logits.dtype)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """DPO on sequence log-probabilities [b]. The implicit rewards are beta x (policy - reference);
    `label_smoothing` eps treats each pair as flipped with probability eps. Returns the loss (the
    batch mean), the rewards' means, their mean margin and the fraction of pairs whose chosen
    reward is the larger."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--dpo-label-smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    logits = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return {"loss": losses.mean(), "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
            "reward_margin": logits.mean(), "accuracy": (logits > 0).to(logits.dtype).mean()}


# ----- PPO ----------------------------------------------------------------------------------------
def kl_penalized_rewards(reward: torch.Tensor, logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [b, s]: -kl_coef x (log pi - log pi_ref) at every response token, plus the
    sequence's scalar `reward` [b] at its last response token."""
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - reference_logprobs) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # the last response token
    return rewards + last.to(rewards.dtype) * reward[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each sequence's response tokens: (advantages, returns
    = advantages + values), both [b, s] and 0 where `mask` is 0. The value after the last response
    token is 0 (the episode ends there)."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m  # padding after the response counts as the end
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`x` scaled to unit variance over the masked entries (and centred with `shift_mean`); the
    variance is the unbiased one. Masked-out entries come back 0."""
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    variance = (((x - mean) ** 2) * mask).sum() / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_average(x: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | None) -> torch.Tensor:
    """sum(x x mask) / `denominator` (the global batch's tokens per micro-batch under the per-token
    loss); the mean over `mask` when None."""
    return masked_mean(x, mask) if denominator is None else token_mean(x, mask, denominator)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float, denominator: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, fraction of tokens where the clip was active), averages over tokens
    (`token_average`)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = token_average(torch.maximum(unclipped, clipped), mask, denominator)
    return loss, token_average((clipped > unclipped).to(logprobs.dtype), mask, denominator)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 x the larger of the squared errors of the values and of the values clipped to within
    `clip` of those the rollout saw, averaged over tokens (`token_average`)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * token_average(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, denominator)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distributions at the response tokens (-inf logits, the
    padding rows', have probability 0 and add nothing)."""
    return masked_mean(torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1), mask)


class AdaptiveKLController:
    """The KL coefficient that steers the measured KL towards `target` (Ziegler et al. 2019):
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) x steps / horizon. `target=None`: fixed."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        if init_coef < 0 or (target is not None and target <= 0) or horizon <= 0:
            raise ValueError("the KL coefficient must be >= 0, its target > 0 and its horizon > 0")
        self.coef, self.target, self.horizon = init_coef, target, horizon

    def update(self, kl: float, steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


# ----- GRPO ---------------------------------------------------------------------------------------
def group_relative_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: each sample's reward minus its group's mean, over the group's standard
    deviation (unbiased) plus `eps`. `rewards` [prompts x group_size], samples of a prompt adjacent."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    groups = rewards.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)
