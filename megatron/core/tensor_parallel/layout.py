"""How each parameter of a model is laid out across ranks: one typed record per parameter.

A `ParamLayout` says how a parameter relates to the full model's: the dimension split over the
tensor-parallel ranks (and into how many fused blocks), whether its gradient is partial per rank
under sequence parallelism, whether it is one of the two pipeline copies of a tied embedding, and
whether it takes the output-projection init. Models that are laid out (`LaidOut`, e.g. the GPT after
`parallelize_gpt`) record one per parameter name; consumers - data parallelism, the optimizers'
gradient norm, checkpointing, initialisation - ask `layouts_of(model)` once and look parameters up.
A parameter nobody described is replicated.

Records are keyed by name in the model (they survive `materialize`, which makes new parameter
objects) and looked up by identity in the `ParamLayouts` value that `layouts_of` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ParamLayout:
    tp_dim: int | None = None        # dimension split over tensor-parallel ranks; None: replicated
    tp_parts: int = 1                # fused blocks (SwiGLU's [gate; up]), each split on its own
    sequence_parallel: bool = False  # replicated, used on sequence-sharded activations: gradient partial per rank
    tied_embedding: bool = False     # a pipeline copy of the tied word embedding (grads summed over the embedding group)
    tied_duplicate: bool = False     # the last stage's copy: gradient norms and parameter counts skip it
    scaled_init: bool = False        # output projection: init std / sqrt(2 * layers)

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_dim is not None

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This rank's piece of the full tensor (the tensor itself when replicated)."""
        if self.tp_dim is None:
            return full
        return shard_of(full, self.tp_dim, tp_rank, tp_size, self.tp_parts)

    def full_shape(self, local_shape: Iterable[int], tp_size: int) -> tuple[int, ...]:
        shape = list(local_shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] *= tp_size
        return tuple(shape)

    def counts_in_norm(self, tp_rank: int) -> bool:
        """Whether this rank's gradient enters the global norm: shards on every rank, replicated
        parameters on tensor-parallel rank 0, the tied embedding's last-stage copy nowhere."""
        return (self.tensor_parallel or tp_rank == 0) and not self.tied_duplicate

    def describe(self) -> dict:
        """The checkpoint's record of how the saved piece was cut."""
        return {"dim": self.tp_dim, "parts": self.tp_parts}


REPLICATED = ParamLayout()


def shard_of(full: torch.Tensor, dim: int, rank: int, size: int, parts: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of `full` along `dim`. With `parts` > 1 the dimension is `parts`
    stacked blocks (SwiGLU's [gate; up]) and each block is split separately, so every rank
    holds matching pieces of each."""
    if full.shape[dim] % (parts * size):
        raise ValueError(f"dimension {full.shape[dim]} cannot be split into {parts} x {size} tensor-parallel "
                         f"pieces; choose sizes divisible by --tensor-model-parallel-size")
    blocks = full.chunk(parts, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim)


class LaidOut:
    """A module that records its parameters' layouts by name (relative to itself)."""

    param_layouts: dict[str, ParamLayout]


class ParamLayouts:
    """Layouts looked up by parameter; parameters with no record are replicated."""

    def __init__(self, pairs: Iterable[tuple[nn.Parameter, ParamLayout]] = ()):
        self._by_id: dict[int, tuple[nn.Parameter, ParamLayout]] = {}
        for param, layout in pairs:
            self._by_id[id(param)] = (param, layout)  # the parameter is kept: ids are not reused

    def __getitem__(self, param: nn.Parameter) -> ParamLayout:
        entry = self._by_id.get(id(param))
        return entry[1] if entry is not None else REPLICATED

    def params(self, **flags: bool) -> list[nn.Parameter]:
        """The recorded parameters whose layout has every given flag, e.g. ``tied_embedding=True``."""
        return [p for p, layout in self._by_id.values()
                if all(getattr(layout, name) == value for name, value in flags.items())]


def layouts_of(model: nn.Module | Iterable[nn.Module]) -> ParamLayouts:
    """The layouts every `LaidOut` part of `model` records (a module, or a list of pipeline chunks)."""
    modules = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    pairs = []
    for module in modules:
        for part in module.modules():
            if isinstance(part, LaidOut):
                named = dict(part.named_parameters(remove_duplicate=False))
                pairs += [(named[name], layout) for name, layout in part.param_layouts.items() if name in named]
    return ParamLayouts(pairs)
