"""Batched generation with a KV cache, for a GPT on one device or split by tensor parallelism.

Prompts of different lengths share one batch: the prefill runs the shortest prompt's length at
once, then the batch advances one position per forward pass; a sequence still inside its
prompt takes its prompt's next token instead of the sampled one. Every position is computed
once (keys and values are cached), so a step costs one token's forward pass per sequence.

Under tensor parallelism every rank of the group runs the same loop on the same prompts: the
vocabulary-parallel logits of the last position are all-gathered once per step, and each rank
samples the same tokens from them (the same logits and the same per-sequence generators).
Pipeline parallelism is refused: generate from a checkpoint loaded at pipeline size 1 (loading
reshards any saved layout). Data parallelism is the caller's: give each rank its own prompts
with their global indices, which seed their sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core.inference.kv_cache import KVCache
from megatron.core.inference.sampling import SamplingParams, choose_tokens, sequence_generators
from megatron.core.parallel_state import ParallelState


@dataclass
class GenerationResult:
    """One prompt's continuation: its new tokens (the end-of-document token included when it
    ended the sequence), the model's log-probability of each (under the unscaled, unfiltered
    distribution, as a policy-gradient update needs) and why it stopped ("eod" or "length")."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


def gather_vocab(logits: torch.Tensor, ps: ParallelState | None) -> torch.Tensor:
    """Full-vocabulary logits [b, V] from this rank's vocabulary slice [b, V / tp]."""
    if ps is None or ps.tp_size == 1:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(ps.tp_size)]
    dist.all_gather(pieces, logits.contiguous(), group=ps.tp_group)
    return torch.cat(pieces, dim=-1)


def _check_model(model, ps: ParallelState | None) -> None:
    if ps is not None and ps.pp_size > 1:
        raise ValueError("generation needs the whole model on each rank: use --pipeline-model-parallel-size 1 "
                         "(a checkpoint saved with pipeline parallelism loads at size 1)")
    if not (model.pre_process and model.post_process):
        raise ValueError("generation needs a model with its embedding and output layer (pipeline size 1)")


@torch.no_grad()
def next_logits(model, tokens: torch.Tensor, ps: ParallelState | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
    """Logits [b, V] (float32 at least; the padding rows' columns -inf) after `tokens` [b, s]: with
    `kv_cache`, `tokens` are the positions after those cached (the cache then holds them too);
    without, the whole sequence."""
    logits = model(tokens, kv_cache=kv_cache, last_only=True)[:, -1]
    if kv_cache is not None:
        kv_cache.advance(tokens.shape[1])
    logits = gather_vocab(logits, ps)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, *, vocab_size: int, eod_id: int | None = None,
             ps: ParallelState | None = None, indices: list[int] | None = None, use_cache: bool = True,
             max_length: int | None = None) -> list[GenerationResult]:
    """Continue each of `prompts` (token ids). `vocab_size`: the tokenizer's; tokens are chosen
    among its ids only (never a padding row, nor a row of the model's past the tokenizer), while
    the log-probabilities are those of the model's distribution (its whole vocabulary, as in
    training); `eod_id`: ends a sequence when `params.stop_on_eod`; `indices`: the
    prompts' global positions (default 0..n-1), which seed their sampling; `use_cache=False`
    recomputes the whole sequence every step (the reference the cache must match); `max_length`
    caps prompt plus continuation (default: the model's --max-position-embeddings)."""
    _check_model(model, ps)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = max_length or model.config.max_position_embeddings
    lengths = [len(p) for p in prompts]
    if max(lengths) >= limit:
        raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room to generate within {limit} positions "
                         "(--max-position-embeddings); shorten it")
    total = min(max(lengths) + params.max_new_tokens, limit)
    device = model.embedding.word_embeddings.weight.device
    batch = len(prompts)
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    generators = sequence_generators(params.seed, list(range(batch)) if indices is None else indices)
    cache = KVCache.for_model(model, batch, total) if use_cache else None
    results = [GenerationResult(list(p), [], [], "length") for p in prompts]
    done = [False] * batch
    was_training = model.training
    model.eval()
    try:
        position = min(lengths)
        logits = next_logits(model, tokens[:, :position], ps, cache)
        while True:
            chosen = choose_tokens(logits[:, :vocab_size], params, generators,
                                   [position >= lengths[row] and not done[row] for row in range(batch)])
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
            for row in range(batch):
                if position < lengths[row]:
                    continue  # still reading its prompt
                if not done[row]:
                    token = int(chosen[row])
                    results[row].tokens.append(token)
                    results[row].logprobs.append(float(logprobs[row]))
                    if params.stop_on_eod and token == eod_id:
                        done[row], results[row].finish_reason = True, "eod"
                    elif len(results[row].tokens) == params.max_new_tokens:
                        done[row] = True
                tokens[row, position] = chosen[row]
            position += 1
            if all(done) or position == total:
                break
            if cache is not None:
                logits = next_logits(model, tokens[:, position - 1:position], ps, cache)
            else:
                logits = next_logits(model, tokens[:, :position], ps)
    finally:
        model.train(was_training)
    return results
