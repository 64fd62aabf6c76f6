"""GRPO and PPO as tasks of the one training loop: the policy (a GPT starting from an SFT
checkpoint) is the trained model, and its data are its own rollouts (`rlhf.rollout`).

GRPO (Shao et al. 2024): `--group-size` samples per prompt, each token's advantage the sample's
reward against its group's mean and spread; loss = the clipped surrogate + `--kl-coef` x the
per-token KL estimate exp(r) - r - 1 (r = log pi_ref - log pi) to the frozen reference; no critic.

PPO (InstructGPT / DeepSpeed-Chat) lives in `rlhf.ppo`, built on the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from fp8.params import param_nbytes
from megatron.core.parallel_state import ParallelState
from megatron.core.pipeline_parallel.token_loss import TOKEN_DENOMINATOR
from megatron.training.config import RunConfig
from megatron.training.flags import Section, flag
from megatron.training.gpt_providers import gpt_task
from megatron.training.inference_model import load_gpt_for_inference
from megatron.training.training import TrainingTask
from rlhf.common import chat_template_for, check_same_tokenizer, fp8_settings_of
from rlhf.losses import ppo_policy_loss, token_average
from rlhf.rewards import load_reward_fn, score
from rlhf.rollout import GroupRelative, PolicyExperience, PromptSet, RolloutSettings, token_losses

FP8_LEVELS = ("none", "O0", "O1", "O2", "O3")


@dataclass(frozen=True)
class RLArgs(Section):
    title: ClassVar[str] = "RLHF rollouts (GRPO and PPO)"
    pretrained_checkpoint: str | None = flag(
        None, "the policy's starting weights (an SFT run's --save folder) when --load holds nothing to resume")
    reference_checkpoint: str | None = flag(None, "the frozen reference model (default: --pretrained-checkpoint)")
    reference_fp8_level: str = flag("none", "GEMMs of the frozen reference: none, O0-O2 FP8 GEMMs, O3 also "
                                            "one-byte FP8 weights", choices=FP8_LEVELS)
    reward_fn: str | None = flag(None, "MODULE:FUNCTION scoring completions (rlhf/rewards.py says how), "
                                       "e.g. rlhf.rewards:builtin_exact_match")
    reward_model: str | None = flag(None, "a reward model's checkpoint (rlhf/train_reward_model.py --save) "
                                          "scoring completions instead of --reward-fn")
    reward_model_fp8_level: str = flag("none", "GEMMs of the frozen reward model (as --reference-fp8-level)",
                                       choices=FP8_LEVELS)
    chat_template: str = flag("auto", "how prompts are rendered: auto, default or a .jinja file (as SFT's)")
    rollout_prompts: int = flag(8, "prompts per iteration, over all data-parallel ranks")
    group_size: int = flag(4, "samples per prompt (GRPO's group; PPO: usually 1)")
    max_new_tokens: int = flag(16, "longest completion")
    temperature: float = flag(1.0, "sampling temperature of the rollouts; the updates' log-probabilities are "
                                   "of the same distribution (logits / temperature)")
    top_k: int = flag(0, "sample from the k most likely tokens (0: all)")
    top_p: float = flag(1.0, "nucleus sampling threshold of the rollouts")
    ppo_epochs: int = flag(1, "passes over each iteration's rollouts (each pass one update per global batch)")
    clip_range: float = flag(0.2, "clip of the policy ratio")
    kl_coef: float = flag(0.04, "weight of the KL to the reference (GRPO: in the loss; PPO: in the reward)")

    def __post_init__(self) -> None:
        for name in ("rollout_prompts", "group_size", "max_new_tokens", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.clip_range < 1:
            raise ValueError(f"--clip-range must be in (0, 1), got {self.clip_range}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        if self.kl_coef < 0:
            raise ValueError(f"--kl-coef must be >= 0, got {self.kl_coef}")
        if (self.reward_fn is None) == (self.reward_model is None):
            raise ValueError("give one of --reward-fn MODULE:FUNCTION or --reward-model DIR")


def check_layout(config: RunConfig) -> None:
    if config.parallel.pipeline_model_parallel_size > 1:
        raise ValueError("RLHF runs whole models on every rank: use --pipeline-model-parallel-size 1 (tensor "
                         "parallelism splits a large model)")
    if config.parallel.sequence_parallel:
        raise ValueError("rollouts decode one position at a time, which sequence parallelism cannot split; drop "
                         "--sequence-parallel")


def check_folder(flag_name: str, folder: str | None) -> None:
    if folder and not Path(folder).is_dir():
        raise ValueError(f"{flag_name} {folder} does not exist; pass a checkpoint folder")


def function_scorer(spec: str):
    fn = load_reward_fn(spec)

    def scorer(completions, records, batch):
        return score(fn, spec, completions, records)
    return scorer


@dataclass
class Rollout:
    """What a policy-gradient task builds before the trainer: prompts, frozen models, scorer."""
    prompts: PromptSet
    settings: RolloutSettings
    reference: torch.nn.Module
    scorer: object
    length: int
    frozen_bytes: dict


def prepare_rollouts(config: RunConfig, ps: ParallelState, tokenizer, tokenizer_config, *, group_size: int,
                     reward_model_scorer=None) -> Rollout:
    rl = config.extra["rl"]
    check_layout(config)
    check_folder("--pretrained-checkpoint", rl.pretrained_checkpoint)
    check_folder("--reference-checkpoint", rl.reference_checkpoint)
    check_folder("--reward-model", rl.reward_model)
    reference_dir = rl.reference_checkpoint or rl.pretrained_checkpoint
    if reference_dir is None:
        raise ValueError("give --pretrained-checkpoint (the SFT model) or --reference-checkpoint: RLHF needs a "
                         "frozen reference")
    check_same_tokenizer(tokenizer_config, {"SFT model": rl.pretrained_checkpoint, "reference model": reference_dir,
                                            "reward model": rl.reward_model})
    paths = config.data.data_path or []
    if len(paths) != 1:
        raise ValueError("give one --data-path: the JSON-lines file of prompts ({\"prompt\": ...} per line)")
    seq = config.data.seq_length
    if rl.max_new_tokens >= seq:
        raise ValueError(f"--max-new-tokens {rl.max_new_tokens} leaves no room for a prompt within --seq-length {seq}")
    template = chat_template_for(tokenizer_config, rl.chat_template)
    prompts = PromptSet(paths[0], template, max_prompt_tokens=seq - rl.max_new_tokens, seed=config.seed)
    length = min(seq, prompts.longest + rl.max_new_tokens)
    reference = load_gpt_for_inference(reference_dir, ps, fp8_level=rl.reference_fp8_level,
                                       fp8_settings=fp8_settings_of(config)).model
    frozen = {"reference_weight_bytes": sum(param_nbytes(p) for p in reference.parameters())}
    if rl.reward_fn is not None:
        scorer = function_scorer(rl.reward_fn)
    else:
        scorer, frozen["reward_model_weight_bytes"] = reward_model_scorer(config, ps, length)
    settings = RolloutSettings(prompts_per_iteration=rl.rollout_prompts, group_size=group_size,
                               max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
                               top_p=rl.top_p, epochs=rl.ppo_epochs, seed=config.seed)
    return Rollout(prompts, settings, reference, scorer, length, frozen)


def completion_tokens(batch: dict) -> torch.Tensor:
    """The tokens a policy update's losses average over: the completions'."""
    return batch["mask"].sum()


# ----- GRPO ---------------------------------------------------------------------------------------
def grpo_loss(batch: dict, clip: float, kl_coef: float, output: torch.Tensor):
    """The clipped surrogate plus kl_coef x the k3 KL estimate, averages over the completion tokens
    (those of the whole global batch under the per-token loss, the default)."""
    logprobs, mask = -output.float(), batch["mask"]
    denominator = batch.get(TOKEN_DENOMINATOR)
    policy_loss, clipped = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, clip,
                                           denominator)
    log_ratio = batch["ref_logprobs"] - logprobs
    kl = token_average(torch.exp(log_ratio) - log_ratio - 1.0, mask, denominator)
    loss = policy_loss + kl_coef * kl
    return loss, {"rl loss": loss.detach(), "policy loss": policy_loss.detach(), "kl k3": kl.detach(),
                  "clip fraction": clipped.detach()}


def grpo_forward_step(data_iterator, model, *, clip: float, kl_coef: float, temperature: float):
    """`model`: the GPT, or the data-parallel wrapper around it (which the schedule passes)."""
    batch = next(data_iterator)
    gpt = getattr(model, "module", model)
    output = token_losses(gpt, model(batch["tokens"]), batch["labels"], temperature)
    return output, partial(grpo_loss, batch, clip, kl_coef)


POLICY_MEANS = {"policy loss": "policy_loss", "clip fraction": "clip_fraction"}
LOG_FIELDS = {"rlhf.reward": "reward", "rlhf.kl": "kl", "rlhf.response_length": "response length"}


def grpo_task(config: RunConfig, ps: ParallelState, tokenizer, tokenizer_config, reward_model_scorer=None
              ) -> TrainingTask:
    rl = config.extra["rl"]
    rollout = prepare_rollouts(config, ps, tokenizer, tokenizer_config, group_size=rl.group_size,
                               reward_model_scorer=reward_model_scorer)
    if rl.group_size < 2:
        raise ValueError("GRPO compares samples of a prompt: use --group-size 2 or more")
    base = gpt_task(config, ps, tokenizer.vocab_size, eod_id=None, start_from=rl.pretrained_checkpoint)

    def experience(trainer):
        exp = PolicyExperience(trainer, prompts=rollout.prompts, settings=rollout.settings, tokenizer=tokenizer,
                               reference=rollout.reference, scorer=rollout.scorer,
                               advantages=GroupRelative(rl.group_size), sequence_length=rollout.length,
                               frozen_bytes=rollout.frozen_bytes)
        return exp

    return replace(base, forward_step=partial(grpo_forward_step, clip=rl.clip_range, kl_coef=rl.kl_coef,
                                              temperature=rl.temperature),
                   datasets_provider=None, experience_provider=experience, initial_weights=rl.pretrained_checkpoint,
                   loss_tokens=completion_tokens, per_token_loss=True,
                   loss_key="rl loss", tokens_per_sample=rollout.length, pipeline_tensor_shape=None,
                   reported_means=dict(POLICY_MEANS, **{"kl k3": "kl_k3"}), log_fields=LOG_FIELDS,
                   metrics_section="rlhf")
