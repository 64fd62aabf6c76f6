"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Sampling draws one uniform number per sequence and step from that sequence's own generator and
takes the token where the filtered distribution's cumulative sum passes it (inverse transform),
with the tokens in descending order of probability (ties by id). A sequence's tokens therefore
depend on its seed and its logits only - not on the batch it shares, the device, or how the
model is split - and agree across layouts unless a draw falls within rounding of a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """`temperature` 0 (or `greedy`) takes the most likely token; otherwise logits are divided by
    `temperature`, cut to the `top_k` most likely (0: all) and to the smallest set whose
    probability reaches `top_p` (1.0: all), renormalised and sampled."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 1234
    stop_on_eod: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def sequence_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per sequence, seeded from `seed` and the sequence's global index."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + index) for index in indices]


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities in descending order, their token ids) after temperature, top-k and top-p;
    each row sums to 1 over the tokens kept, 0 elsewhere. `logits` [b, V] float32."""
    scaled = logits / params.temperature
    # Descending by value, ties by ascending id (a stable sort of the negated values).
    order = torch.sort(-scaled, dim=-1, stable=True).indices
    sorted_logits = scaled.gather(-1, order)
    if params.top_k:
        sorted_logits[:, params.top_k:] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    if params.top_p < 1.0:
        # Keep a token while the mass before it is below top_p (the first is always kept).
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= params.top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, order


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator],
                  active: list[bool] | None = None) -> torch.Tensor:
    """Next token per row of `logits` [b, V] (float32 at least). Only `active` rows (default all)
    draw from their generators, so a sequence's n-th token always uses its n-th draw."""
    if params.is_greedy:
        return logits.argmax(-1)
    probs, order = filtered_probs(logits, params)
    active = active or [True] * len(generators)
    draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) if on else torch.zeros((), dtype=torch.float64)
                         for g, on in zip(generators, active)]).to(logits.device)
    cdf = probs.double().cumsum(-1)
    # The first position whose cumulative probability exceeds the draw (the last kept, for a
    # draw above a sum that rounding left just below 1).
    position = torch.searchsorted(cdf, draws[:, None], right=True).squeeze(-1)
    kept = (probs > 0).sum(-1) - 1
    position = torch.minimum(position, kept)
    return order.gather(-1, position[:, None]).squeeze(-1)
