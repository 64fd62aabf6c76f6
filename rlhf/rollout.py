"""Rollouts as the training loop's `Experience`: each iteration samples completions of prompts from
the policy being trained (the KV-cache generator), scores them and turns them into the micro-batches
of its policy-gradient updates.

One iteration, on every rank:

1. prompts: `prompts_per_iteration` of the prompt file (a fresh seeded order per pass over it),
   `group_size` samples of each (GRPO's group; 1 for PPO); each update's global batch of
   rollouts is split over the data-parallel ranks (`local_samples`);
2. generation with the policy at its current weights; sample `k` of global prompt `i` is drawn
   by its own generator seeded by (seed, i x group_size + k), so the rollouts depend on the
   iteration and the weights only (not on the layout, nor on where a resumed run started);
3. a fresh forward pass of the policy over prompt + completion in the update's micro-batches gives
   the log-probabilities the updates' ratios start from (and the entropy), the frozen reference's
   forward its log-probabilities, the reward function or model one reward per completion;
4. the algorithm's advantages (`GroupRelative` for GRPO, `PPOAdvantages` with the critic's values);
5. `epochs` passes over the rollouts, each `minibatches` optimizer updates of one global batch.

Tensor-parallel ranks of a group generate and score the same rollouts (same prompts, same
generators, gathered logits); the reward of a function is broadcast from the group's first rank so
that a function with side effects cannot make them disagree. Sequence parallelism is not supported
for rollouts (the generator decodes one position at a time).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.datasets.chat_template import ChatTemplate
from megatron.core.datasets.corpus_readers import json_lines
from megatron.core.distributed import comm
from megatron.core.inference import SamplingParams, generate
from megatron.core.inference.generation import gather_vocab
from megatron.core.parallel_state import ParallelState
from rlhf.data import _messages
from rlhf.losses import group_relative_advantages


# ----- prompts ----------------------------------------------------------------------------------
class PromptSet:
    """The prompts of a JSON-lines file, encoded up to the assistant's turn with the chat template.
    A record is {"prompt": str or [messages], ...}: the other fields go to the reward function."""

    def __init__(self, path: str | Path, template: ChatTemplate, *, max_prompt_tokens: int, seed: int):
        self.records: list[dict] = []
        self.tokens: list[list[int]] = []
        self.dropped = 0
        for where, record in json_lines(path, "prompt data"):
            if not isinstance(record, dict) or "prompt" not in record:
                raise ValueError(f"{where}: a prompt record needs a 'prompt' (a string or a list of messages)")
            prompt = record["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, where, "prompt")
            if not messages or messages[-1]["role"] == "assistant":
                raise ValueError(f"{where}: the prompt must end with a user (or system) turn for the model to answer")
            ids = [int(t) for t in template.prompt_tokens(messages, where)]
            if len(ids) > max_prompt_tokens:
                self.dropped += 1
                continue
            self.records.append(record)
            self.tokens.append(ids)
        if not self.records:
            raise ValueError(f"{path} holds no prompt of at most {max_prompt_tokens} tokens; shorten the prompts or "
                             f"raise --seq-length")
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def longest(self) -> int:
        return max(len(t) for t in self.tokens)

    def index(self, global_index: int) -> int:
        """The prompt the `global_index`-th draw takes: a seeded permutation per pass."""
        epoch, position = divmod(global_index, len(self.records))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.RandomState(self.seed + epoch).permutation(len(self.records))}
        return int(self._orders[epoch][position])


def token_losses(gpt, logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-log p(label) [b, s] under the distribution of `logits` [b, s, V / tp] over `temperature`
    (the one rollouts are sampled from), by the GPT's own cross entropy (vocabulary-parallel under
    tensor parallelism): the update's loss and the rollout's reference values take this one path."""
    if temperature != 1.0:
        logits = logits / temperature
    return gpt.cross_entropy(logits.transpose(0, 1), labels.t().contiguous()).t()


# ----- settings and the micro-batch feed --------------------------------------------------------
@dataclass(frozen=True)
class RolloutSettings:
    prompts_per_iteration: int
    group_size: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    epochs: int
    seed: int


class Feed:
    """The micro-batches an iteration's updates consume, in order (the trainer's data iterator)."""

    def __init__(self):
        self.items: collections.deque = collections.deque()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.items:
            raise RuntimeError("the updates asked for more micro-batches than the rollouts made")
        return self.items.popleft()


def _agree_on_error(error: str | None, ps: ParallelState) -> None:
    """Raise the first rank's error on every rank (a rank that stops alone leaves the others
    waiting in the next collective)."""
    errors = [error]
    if ps.world_size > 1:
        errors = [None] * ps.world_size
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ValueError(first)


# ----- the experience ---------------------------------------------------------------------------
class PolicyExperience:
    """The rollouts of one iteration, as `megatron.training.training.Experience`. `policy(model)`
    picks the policy out of the trainer's model (the model itself, or an actor-critic pair's
    actor); `reference` is the frozen reference model; `scorer(completions, records, tokens)`
    returns (rewards, error); `advantages` computes the algorithm's advantages from the batch."""

    def __init__(self, trainer, *, prompts: PromptSet, settings: RolloutSettings, tokenizer, reference,
                 scorer, advantages, policy=lambda model: model, sequence_length: int,
                 frozen_bytes: dict | None = None):
        config, ps = trainer.config, trainer.ps
        self.trainer, self.ps, self.prompts, self.settings = trainer, ps, prompts, settings
        self.tokenizer, self.reference, self.scorer, self.advantages = tokenizer, reference, scorer, advantages
        self.policy = policy
        self.micro_batch_size = config.micro_batch_size
        samples = settings.prompts_per_iteration * settings.group_size
        if samples % config.global_batch_size:
            raise ValueError(f"an iteration's {samples} rollouts (--rollout-prompts x --group-size) must be a multiple "
                             f"of --global-batch-size {config.global_batch_size}: each update takes one global batch")
        self.samples = samples
        self.minibatches = samples // config.global_batch_size
        self.updates = settings.epochs * self.minibatches
        self.length = sequence_length
        self.pad = tokenizer.eod if tokenizer.eod is not None else 0
        self.iterator = Feed()
        self.frozen_bytes = dict(frozen_bytes or {})  # the frozen models' weights, for the metrics record

    # what the checkpoint keeps: nothing but what `advantages` carries (PPO's adaptive KL)
    def state_dict(self) -> dict:
        return self.advantages.state_dict() if hasattr(self.advantages, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.advantages, "load_state_dict"):
            self.advantages.load_state_dict(state)

    def local_samples(self) -> list[int]:
        """This rank's rollouts by their index j in the iteration (sample j % group_size of the
        iteration's prompt j // group_size): update m trains on rollouts [m B, (m + 1) B) of the
        global batch size B, and each data-parallel rank takes its B / DP of each, so every update
        sees the same rollouts under any layout."""
        batch, dp = self.trainer.config.global_batch_size, self.ps.dp_size
        share = batch // dp
        return [m * batch + self.ps.dp_rank * share + i for m in range(self.minibatches) for i in range(share)]

    @torch.no_grad()
    def collect(self, iteration: int) -> dict:
        s, ps = self.settings, self.ps
        model = self.trainer.model
        policy = self.policy(model)
        local = self.local_samples()
        draws = [iteration * s.prompts_per_iteration + j // s.group_size for j in local]
        chosen = [self.prompts.index(d) for d in draws]
        prompt_tokens = [self.prompts.tokens[i] for i in chosen]
        records = [self.prompts.records[i] for i in chosen]
        # Sample k of draw d has its own generator, seeded by d x group_size + k.
        indices = [d * s.group_size + j % s.group_size for d, j in zip(draws, local)]
        params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, seed=s.seed)
        model.eval()
        results = generate(policy, prompt_tokens, params, vocab_size=self.tokenizer.vocab_size,
                           eod_id=self.tokenizer.eod, ps=ps, indices=indices, max_length=self.length)
        batch = self._sequences(results)
        completions = [self.tokenizer.detokenize([t for t in r.tokens if t != self.tokenizer.eod]) for r in results]
        rewards, error = self.scorer(completions, records, batch)
        _agree_on_error(error, ps)
        rewards = torch.tensor(rewards, dtype=torch.float32, device=ps.device)
        comm.broadcast(rewards, ps, "tp", src_group_rank=0)
        batch["rewards"] = rewards
        # Every rollout's reward in the iteration's order (GRPO's groups may span ranks).
        gathered = comm.all_gather(rewards, ps, "dp").view(ps.dp_size, self.minibatches, -1)
        batch["all_rewards"] = gathered.transpose(0, 1).reshape(-1)
        batch["sample_index"] = torch.tensor(local, dtype=torch.long, device=ps.device)
        self._forward_passes(model, policy, batch)
        stats = self.advantages(batch, model)
        self._feed(batch)
        mask = batch["mask"]
        kl = ((batch["old_logprobs"] - batch["ref_logprobs"]) * mask).sum(-1)  # per sequence
        sums = torch.stack([kl.sum(), (batch["entropy"] * mask).sum(), mask.sum()]).double()
        comm.all_reduce(sums, ps, "dp")
        kl_sum, entropy_sum, tokens = sums.tolist()
        count = float(self.samples)
        record = {"reward": float(batch["all_rewards"].double().mean()), "kl": kl_sum / count,
                  "entropy": entropy_sum / max(tokens, 1.0), "response_length": tokens / count}
        record.update(stats)
        if self.frozen_bytes:
            record["frozen_memory"] = dict(self.frozen_bytes)
        return record

    def _sequences(self, results) -> dict:
        """Prompt + completion per row, right-padded to the run's rollout length; `labels` the next
        token; `mask` 1 at the positions whose label is a completion token (end of document too)."""
        n, L = len(results), self.length
        tokens = torch.full((n, L), self.pad, dtype=torch.long)
        mask = torch.zeros(n, L)
        for row, r in enumerate(results):
            ids = r.prompt + r.tokens
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, len(r.prompt) - 1:len(ids) - 1] = 1.0
        labels = torch.full_like(tokens, self.pad)
        labels[:, :-1] = tokens[:, 1:]
        device = self.ps.device
        return {"tokens": tokens.to(device), "labels": labels.to(device), "mask": mask.to(device)}

    def micro_batches(self, n: int) -> list[slice]:
        return [slice(start, start + self.micro_batch_size) for start in range(0, n, self.micro_batch_size)]

    def _forward_passes(self, model, policy, batch: dict) -> None:
        """The policy's log-probabilities and entropy, and the reference's log-probabilities, per
        label position, computed in the updates' micro-batches: all of the distribution the
        rollouts were sampled from (logits over the temperature, as the updates compute them)."""
        old, ref, ent = [], [], []
        temperature = self.settings.temperature
        for part in self.micro_batches(batch["tokens"].shape[0]):
            tokens, labels = batch["tokens"][part], batch["labels"][part]
            logits = policy(tokens)  # [b, s, V / tp]
            old.append(-token_losses(policy, logits, labels, temperature).float())
            full = gather_vocab(logits, self.ps).float() / temperature  # padding columns: -inf
            ent.append(torch.special.entr(torch.softmax(full, dim=-1)).sum(-1))
            ref.append(-token_losses(self.reference, self.reference(tokens), labels, temperature).float())
        batch["old_logprobs"], batch["ref_logprobs"], batch["entropy"] = torch.cat(old), torch.cat(ref), torch.cat(ent)

    def _feed(self, batch: dict) -> None:
        n = batch["tokens"].shape[0]
        per_update = n // self.minibatches
        keys = [k for k in batch if k not in ("entropy", "rewards", "all_rewards", "sample_index")]
        for _ in range(self.settings.epochs):
            for m in range(self.minibatches):
                for part in self.micro_batches(per_update):
                    rows = slice(m * per_update + part.start, m * per_update + part.stop)
                    self.iterator.items.append({k: batch[k][rows] for k in keys})


# ----- advantages -------------------------------------------------------------------------------
class GroupRelative:
    """GRPO: each completion's reward against its group's (same prompt) mean and spread, at every
    one of its tokens."""

    def __init__(self, group_size: int):
        self.group_size = group_size

    def __call__(self, batch: dict, model) -> dict:
        every = batch["all_rewards"]
        advantages = group_relative_advantages(every, self.group_size)[batch["sample_index"]]
        batch["advantages"] = advantages[:, None] * batch["mask"]
        groups = every.view(-1, self.group_size)
        return {"groups_with_signal": float((groups.std(dim=1) > 0).float().mean())}
