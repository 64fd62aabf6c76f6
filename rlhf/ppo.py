"""PPO as InstructGPT and DeepSpeed-Chat run it, as a task of the one training loop.

The trained model is an actor-critic pair (`ActorCritic`): the actor a GPT starting from the SFT
checkpoint, the critic a scalar-head GPT (`rlhf.models.ScalarHeadGPT`) starting from the reward
model (or, without one, from the SFT backbone with a fresh head). One optimizer updates both; their
parameters are disjoint, so each moves by its own gradients (`--vf-coef` weighs the value loss
within the clipped global gradient norm). The reference and the reward model are frozen.

Each iteration (`rlhf.rollout.PolicyExperience` with `PPOAdvantages`): rollouts of the actor, the
reward per completion (a reward model at its last token, or `--reward-fn`), per-token rewards
with the KL penalty to the reference (`--kl-coef`, adaptive towards `--kl-target`), the critic's
values, GAE (`--gamma`, `--lam`), advantages whitened over the iteration's rollouts (all ranks),
then `--ppo-epochs` passes of clipped policy and value updates.

A PPO checkpoint holds both models under `actor.` and `critic.`; `load_gpt_for_inference` (hence
tools/generate.py and tools/sft_eval.py) reads its actor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar

import torch
import torch.nn as nn

from fp8.params import param_nbytes
from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState
from megatron.core.pipeline_parallel.token_loss import TOKEN_DENOMINATOR
from megatron.training.config import RunConfig
from megatron.training.flags import Section, flag
from megatron.training.gpt_providers import gpt_task, gpt_transformer, model_provider, model_signature
from megatron.training.inference_model import load_gpt_weights
from megatron.training.training import TrainingTask
from rlhf.common import fp8_settings_of
from rlhf.losses import AdaptiveKLController, gae, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss
from rlhf.models import (
    load_reward_model_for_inference, reward_model_provider, reward_model_signature, sequence_rewards,
)
from rlhf.policy_gradient import LOG_FIELDS, POLICY_MEANS, check_folder, completion_tokens, prepare_rollouts
from rlhf.rollout import PolicyExperience, token_losses


@dataclass(frozen=True)
class PPOArgs(Section):
    title: ClassVar[str] = "PPO"
    critic_checkpoint: str | None = flag(None, "the critic's starting weights: a reward model's checkpoint (default: "
                                               "--reward-model), or a GPT's (its backbone, a fresh value head)")
    gamma: float = flag(1.0, "discount of the per-token rewards")
    lam: float = flag(0.95, "GAE's lambda")
    value_clip: float = flag(0.2, "clip of the values around those of the rollouts")
    vf_coef: float = flag(0.5, "weight of the value loss")
    kl_target: float | None = flag(None, "adapt the KL coefficient towards this KL per sequence (default: fixed)")
    kl_horizon: int = flag(10000, "the adaptive KL coefficient's horizon, in rollouts")

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"--gamma and --lam must lie in [0, 1], got {self.gamma} and {self.lam}")
        if self.value_clip <= 0 or self.vf_coef < 0:
            raise ValueError("--value-clip must be > 0 and --vf-coef >= 0")


class ActorCritic(nn.Module):
    """The two trained models of PPO; `forward(tokens, labels, temperature)` -> (the actor's
    per-token -log p(label) under logits / temperature, the critic's values), both [b, s]."""

    def __init__(self, actor: nn.Module, critic: nn.Module):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.config = actor.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
        return token_losses(self.actor, self.actor(input_ids), labels, temperature), self.critic(input_ids)


def actor_critic_provider(config: RunConfig, ps: ParallelState, rng, *, transformer, actor_from: str | None,
                          critic_from: str | None) -> ActorCritic:
    actor = model_provider(config, ps, rng, transformer=transformer)
    if actor_from:
        load_gpt_weights(actor, actor_from, ps)
    critic = reward_model_provider(config, ps, rng, transformer=transformer, init_from=critic_from)
    return ActorCritic(actor, critic)


def _masked_sums(x: torch.Tensor, mask: torch.Tensor, ps: ParallelState) -> tuple[float, float, float]:
    """(sum, sum of squares, count) of the masked entries over every data-parallel rank."""
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    comm.all_reduce(sums, ps, "dp")
    return tuple(sums.tolist())


class PPOAdvantages:
    """The critic's values, KL-penalised per-token rewards, GAE and whitened advantages of a
    rollout batch; the adaptive KL coefficient (saved with the checkpoint)."""

    def __init__(self, ps: ParallelState, *, gamma: float, lam: float, kl: AdaptiveKLController, micro_batch_size: int):
        self.ps, self.gamma, self.lam, self.kl, self.micro_batch_size = ps, gamma, lam, kl, micro_batch_size

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])

    def __call__(self, batch: dict, model: ActorCritic) -> dict:
        mask, ps = batch["mask"], self.ps
        values = torch.cat([model.critic(batch["tokens"][i:i + self.micro_batch_size]).float()
                            for i in range(0, batch["tokens"].shape[0], self.micro_batch_size)])
        coef = self.kl.coef
        rewards = kl_penalized_rewards(batch["rewards"], batch["old_logprobs"], batch["ref_logprobs"], mask, coef)
        advantages, returns = gae(rewards, values * mask, mask, self.gamma, self.lam)
        total, squares, count = _masked_sums(advantages, mask, ps)
        mean = total / count
        variance = (squares - count * mean * mean) / max(count - 1.0, 1.0)
        batch["advantages"] = (advantages - mean) * torch.rsqrt(torch.tensor(variance + 1e-8)) * mask
        batch["returns"], batch["old_values"] = returns, values * mask
        kl_total, _, sequences = _masked_sums(((batch["old_logprobs"] - batch["ref_logprobs"]) * mask).sum(-1),
                                              torch.ones_like(batch["rewards"]), ps)
        self.kl.update(kl_total / sequences, int(sequences))
        value_sum, _, tokens = _masked_sums(values, mask, ps)
        return {"kl_coef": coef, "value_mean": value_sum / tokens}


def ppo_loss(batch: dict, clip: float, value_clip: float, vf_coef: float, output):
    losses, values = output
    logprobs, mask = -losses.float(), batch["mask"]
    denominator = batch.get(TOKEN_DENOMINATOR)
    policy_loss, clipped = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, clip,
                                           denominator)
    value_loss = ppo_value_loss(values.float(), batch["old_values"], batch["returns"], mask, value_clip, denominator)
    loss = policy_loss + vf_coef * value_loss
    return loss, {"rl loss": loss.detach(), "policy loss": policy_loss.detach(), "value loss": value_loss.detach(),
                  "clip fraction": clipped.detach()}


def ppo_forward_step(data_iterator, model, *, clip: float, value_clip: float, vf_coef: float, temperature: float):
    batch = next(data_iterator)
    return (model(batch["tokens"], batch["labels"], temperature),
            partial(ppo_loss, batch, clip, value_clip, vf_coef))


def reward_model_scorer(config: RunConfig, ps: ParallelState, length: int):
    """(scorer, the frozen reward model's weight bytes): the reward model's value at each
    completion's last token."""
    rl = config.extra["rl"]
    model = load_reward_model_for_inference(rl.reward_model, ps, fp8_level=rl.reward_model_fp8_level,
                                            fp8_settings=fp8_settings_of(config)).model
    micro = config.micro_batch_size

    @torch.no_grad()
    def scorer(completions, records, batch):
        mask = batch["mask"]
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = ((positions + 1) * (mask > 0)).max(dim=1).values  # the last completion token's position
        rewards = torch.cat([sequence_rewards(model(batch["tokens"][i:i + micro]).float(), last[i:i + micro])
                             for i in range(0, mask.shape[0], micro)])
        if not torch.isfinite(rewards).all():
            return [], f"the reward model {rl.reward_model} gave a non-finite reward; check its checkpoint"
        return rewards.tolist(), None

    return scorer, sum(param_nbytes(p) for p in model.parameters())


def ppo_task(config: RunConfig, ps: ParallelState, tokenizer, tokenizer_config) -> TrainingTask:
    rl, ppo = config.extra["rl"], config.extra["ppo"]
    check_folder("--critic-checkpoint", ppo.critic_checkpoint)
    rollout = prepare_rollouts(config, ps, tokenizer, tokenizer_config, group_size=rl.group_size,
                               reward_model_scorer=reward_model_scorer)
    base = gpt_task(config, ps, tokenizer.vocab_size, eod_id=None, start_from=rl.pretrained_checkpoint)
    transformer = gpt_transformer(config, ps, tokenizer.vocab_size, rl.pretrained_checkpoint)
    critic_from = ppo.critic_checkpoint or rl.reward_model or rl.pretrained_checkpoint
    kl = AdaptiveKLController(rl.kl_coef, ppo.kl_target, ppo.kl_horizon)
    head = transformer.vocab_size * transformer.hidden_size if transformer.untie_embeddings_and_output_weights else 0
    num_params = 2 * transformer.num_parameters() - head + transformer.hidden_size + 1

    def experience(trainer):
        return PolicyExperience(trainer, prompts=rollout.prompts, settings=rollout.settings, tokenizer=tokenizer,
                                reference=rollout.reference, scorer=rollout.scorer,
                                advantages=PPOAdvantages(ps, gamma=ppo.gamma, lam=ppo.lam, kl=kl,
                                                         micro_batch_size=config.micro_batch_size),
                                policy=lambda model: model.actor, sequence_length=rollout.length,
                                frozen_bytes=rollout.frozen_bytes)

    return replace(base, model_provider=partial(actor_critic_provider, transformer=transformer,
                                                actor_from=rl.pretrained_checkpoint, critic_from=critic_from),
                   forward_step=partial(ppo_forward_step, clip=rl.clip_range, value_clip=ppo.value_clip,
                                        vf_coef=ppo.vf_coef, temperature=rl.temperature),
                   datasets_provider=None, experience_provider=experience, initial_weights=None,
                   loss_tokens=completion_tokens, per_token_loss=True,
                   loss_key="rl loss", tokens_per_sample=rollout.length, pipeline_tensor_shape=None,
                   flops_per_token=None, num_params=num_params,
                   model_signature={"actor": model_signature(transformer),
                                    "critic": reward_model_signature(transformer)},
                   reported_means=dict(POLICY_MEANS, **{"value loss": "value_loss"}),
                   log_fields=dict(LOG_FIELDS, **{"rlhf.value_loss": "value loss"}), metrics_section="rlhf")
