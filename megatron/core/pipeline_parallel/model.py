"""Splitting a GPT into pipeline stages, and keeping a tied embedding one across them.

Stage r of p holds layers [r * L/p, (r + 1) * L/p) of the L-layer model; the first stage also
holds the embedding, the last the final norm, the output layer and the loss. With virtual
stages (interleaving, `--num-layers-per-virtual-pipeline-stage` = n) rank r holds
L / (p * n) chunks, chunk c being virtual stage c * p + r with layers [(c*p + r) * n, ... + n).

Layers keep their global numbers, so `parallelize.initialize_parameters` gives every layout
the same weights from one seed. With tied embeddings the last stage's output weight is a
separate parameter initialised from the embedding's name (see `parallelize.global_name`);
`allreduce_embedding_grads` sums the two gradients after every backward, so equal gradients
and equal optimizer states keep the copies equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from megatron.core.distributed import comm
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.layout import layouts_of
from megatron.core.transformer.config import TransformerConfig


def virtual_pipeline_size(num_layers: int, pp_size: int, num_layers_per_virtual_stage: int | None) -> int | None:
    """Model chunks per rank for interleaving, or None without it; checks that layers divide."""
    if num_layers % pp_size:
        raise ValueError(f"--num-layers ({num_layers}) must be divisible by --pipeline-model-parallel-size "
                         f"({pp_size}); each stage holds the same number of layers")
    if num_layers_per_virtual_stage is None:
        return None
    if pp_size == 1:
        raise ValueError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1; "
                         "drop it or raise the pipeline size")
    per_stage = num_layers // pp_size
    if num_layers_per_virtual_stage < 1 or per_stage % num_layers_per_virtual_stage:
        raise ValueError(f"--num-layers-per-virtual-pipeline-stage ({num_layers_per_virtual_stage}) must divide the "
                         f"{per_stage} layers of each pipeline stage (--num-layers / --pipeline-model-parallel-size)")
    return per_stage // num_layers_per_virtual_stage


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, *, virtual_stage: int = 0,
                 num_layers_per_virtual_stage: int | None = None) -> tuple[int, int]:
    """(first layer, number of layers) of one stage, or of one of its virtual stages."""
    chunks = virtual_pipeline_size(num_layers, pp_size, num_layers_per_virtual_stage) or 1
    if not 0 <= virtual_stage < chunks:
        raise ValueError(f"virtual stage {virtual_stage} does not exist; this layout has {chunks} per rank")
    count = num_layers // (pp_size * chunks)
    return (virtual_stage * pp_size + pp_rank) * count, count


def build_gpt_stage(config: TransformerConfig, ps: ParallelState, *, device="meta", virtual_stage: int | None = None,
                    num_layers_per_virtual_stage: int | None = None) -> GPTModel:
    """This rank's part of the GPT (one model chunk when `virtual_stage` is given), not yet laid
    out for tensor parallelism nor initialised: call `parallelize_gpt` and then
    `initialize_parameters` on it, as on a whole model."""
    if (virtual_stage is None) != (num_layers_per_virtual_stage is None):
        raise ValueError("give virtual_stage and num_layers_per_virtual_stage together (interleaving) or neither")
    chunk = virtual_stage or 0
    first_layer, count = stage_layers(config.num_layers, ps.pp_size, ps.pp_rank, virtual_stage=chunk,
                                      num_layers_per_virtual_stage=num_layers_per_virtual_stage)
    chunks = virtual_pipeline_size(config.num_layers, ps.pp_size, num_layers_per_virtual_stage) or 1
    return GPTModel(config, pre_process=ps.is_first_stage and chunk == 0,
                    post_process=ps.is_last_stage and chunk == chunks - 1,
                    first_layer=first_layer, num_layers=count, device=device)


def build_gpt_stages(config: TransformerConfig, ps: ParallelState, *, device="meta",
                     num_layers_per_virtual_stage: int | None = None) -> list[GPTModel]:
    """Every model chunk of this rank, in schedule order (one without interleaving)."""
    chunks = virtual_pipeline_size(config.num_layers, ps.pp_size, num_layers_per_virtual_stage)
    if chunks is None:
        return [build_gpt_stage(config, ps, device=device)]
    return [build_gpt_stage(config, ps, device=device, virtual_stage=c,
                            num_layers_per_virtual_stage=num_layers_per_virtual_stage) for c in range(chunks)]


def _modules(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def shared_embedding_params(model: nn.Module | Sequence[nn.Module]) -> list[nn.Parameter]:
    """This rank's copies of a tied embedding split across stages (none on middle stages)."""
    return layouts_of(_modules(model)).params(tied_embedding=True)


def allreduce_embedding_grads(model: nn.Module | Sequence[nn.Module], ps: ParallelState, grad_of) -> None:
    """Sum the tied embedding's gradient (``grad_of(param)``, the data-parallel wrapper's
    `dense_grad`) over the first and last stage.

    Call after the schedule's last backward, next to the data-parallel gradient sync (either
    order: both are sums) and before the optimizer step. A no-op without pipelining, with untied
    embeddings, and on middle stages."""
    if ps.pp_size == 1 or not ps.is_embedding_rank:
        return
    params = shared_embedding_params(model)
    assert len(params) <= 1, "one tied embedding copy per rank"
    for param in params:
        comm.all_reduce(grad_of(param), ps, "embedding")


def count_parameters(model: nn.Module | Sequence[nn.Module]) -> int:
    """Parameters this rank holds, each tied embedding counted once across the pipeline."""
    params = {id(p): p for module in _modules(model) for p in module.parameters()}
    layouts = layouts_of(_modules(model))
    return sum(p.numel() for p in params.values() if not layouts[p].tied_duplicate)


__all__ = [
    "allreduce_embedding_grads", "build_gpt_stage", "build_gpt_stages", "count_parameters",
    "shared_embedding_params", "stage_layers", "virtual_pipeline_size",
]
