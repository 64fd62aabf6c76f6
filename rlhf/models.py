"""The reward model of RLHF: the GPT backbone with a scalar head in place of the LM head.

    model = ScalarHeadGPT(config, device="meta")
    parallelize_scalar_head_gpt(model, ps, sequence_parallel=True, rng=tracker)
    initialize_parameters(model, ps, seed=1234)
    values = model(tokens)                                  # [b, s]: one scalar per position
    rewards = sequence_rewards(values, last_index)          # [b]: at each sequence's last token

The head `output_layer` is `nn.Linear(hidden, 1)` with a bias, never tied to the embeddings and
replicated on every tensor-parallel rank (the backbone is laid out as `parallelize_gpt` lays out a
GPT). Under sequence parallelism each rank applies it to its part of the sequence and the scalars
are all-gathered (a few bytes per token instead of the hidden states); its gradient is then partial
per rank, which its layout (`sequence_parallel=True`) tells data parallelism to sum. Every other
parameter has the GPT's name, so a GPT checkpoint (pretraining or SFT) gives the backbone; its LM
head is left out. The head is initialised as any linear of the GPT (normal, the run's
`init_method_std`, seeded by its name; bias zero), the same at every layout.

A reward model's checkpoint records ``"head": "scalar"`` in its model signature, which tells it
apart from a GPT's (`is_reward_model_checkpoint`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from fp8.params import is_fp8_param, set_param_value
from megatron.core import checkpointing
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name, initialize_parameters, materialize, parallelize_gpt
from megatron.core.precision import LEVELS, apply_inference_precision
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layout import ParamLayout, layouts_of
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import attach_rng_tracker
from megatron.training.gpt_providers import model_signature
from megatron.training.inference_model import (
    LoadedModel, SavedCheckpoint, inference_fp8_config, check_tensor_parallel_fits, open_checkpoint,
)

HEAD = "output_layer"
# What a reward model's checkpoint adds to the GPT's model signature.
SIGNATURE = {"head": "scalar"}
# Signature keys that need not agree between a checkpoint and the backbone it gives: the LM head's
# tying (the scalar head is never tied) and the padded vocabulary (padding depends on the
# tensor-parallel size; the real rows are fitted, see `_fit_rows`).
_FREE_KEYS = ("untie_embeddings_and_output_weights", "vocab_size", "unpadded_vocab_size")


class ScalarHeadGPT(GPTModel):
    """A GPT whose output layer is a scalar head: without labels, `forward` returns one value per
    position, [b, s] (the hidden states [s, b, h] on a pipeline stage without the head)."""

    def __init__(self, config: TransformerConfig, *, pre_process: bool = True, post_process: bool = True,
                 first_layer: int = 0, num_layers: int | None = None, device=None):
        # The parent builds its LM head on `device` (free on meta); the scalar head replaces it.
        super().__init__(config, pre_process=pre_process, post_process=post_process, first_layer=first_layer,
                         num_layers=num_layers, device=device)
        if post_process:
            self.output_layer = nn.Linear(config.hidden_size, 1, bias=True, device=device, dtype=config.params_dtype)
            del self.cross_entropy

    @property
    def shares_embeddings_and_output_weights(self) -> bool:
        return False

    def head_output(self, values: torch.Tensor) -> torch.Tensor:
        return values  # one value per position: no vocabulary to mask

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        if labels is not None:
            raise TypeError("a reward model has no labels; call it with the token ids alone")
        output = super().forward(input_ids, None, **kwargs)
        return output.squeeze(-1) if self.post_process else output


def parallelize_scalar_head_gpt(model: ScalarHeadGPT, ps: ParallelState, *, sequence_parallel: bool = False,
                                rng=None) -> ScalarHeadGPT:
    """`parallelize_gpt` for the backbone; the head stays a replicated `nn.Linear`."""
    head, model.output_layer = model.output_layer, None
    parallelize_gpt(model, ps, sequence_parallel=sequence_parallel, rng=rng)
    model.output_layer = head
    if head is not None:
        sp = sequence_parallel and ps.tp_size > 1
        for name, _ in head.named_parameters():
            model.param_layouts[f"{HEAD}.{name}"] = ParamLayout(sequence_parallel=sp)
        if sp:  # [s / tp, b, 1] -> [s, b, 1]; backward keeps this rank's part of the (full) gradient
            head.register_forward_hook(
                lambda module, args, out: mappings.gather_from_sequence_parallel_region(
                    out, ps, tensor_parallel_output_grad=False))
    return model


def sequence_rewards(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """The value at each sequence's last real token: `values` [b, s], `last_index` [b] -> [b]."""
    return values.gather(1, last_index.to(values.device, torch.long)[:, None]).squeeze(1)


def reward_model_signature(config: TransformerConfig) -> dict:
    return {**model_signature(config), **SIGNATURE}


def is_reward_model_checkpoint(saved: SavedCheckpoint) -> bool:
    return (saved.metadata.get("model") or {}).get("head") == SIGNATURE["head"]


# ----- building and loading ----------------------------------------------------------------------
def reward_model_provider(config, ps: ParallelState, rng, *, transformer: TransformerConfig,
                          init_from: str | None = None) -> ScalarHeadGPT:
    """The Trainer's model: built on meta, laid out, initialised, then (with `init_from`, a GPT's or
    a reward model's checkpoint folder) every backbone weight taken from that checkpoint at this
    tensor-parallel size - and the head too when it is a reward model's. The checkpoint's padded
    vocabulary may differ from this run's (another tensor-parallel size): its real rows are taken,
    so callers check first that it speaks the run's tokenizer (`rlhf.common.check_same_tokenizer`)."""
    if ps.pp_size > 1:
        raise ValueError("the reward model does not support pipeline parallelism; use "
                         "--pipeline-model-parallel-size 1 (tensor parallelism splits a large model)")
    model = ScalarHeadGPT(transformer, device="meta")
    parallelize_scalar_head_gpt(model, ps, sequence_parallel=config.parallel.sequence_parallel, rng=rng)
    attach_rng_tracker(model, rng)
    initialize_parameters(model, ps, seed=config.training.seed, device=ps.device)
    if init_from:
        saved = open_checkpoint(init_from)
        check_backbone_matches(saved, transformer)
        load_weights(model, saved, ps, with_head=is_reward_model_checkpoint(saved))
    return model


def check_backbone_matches(saved: SavedCheckpoint, transformer: TransformerConfig) -> None:
    """One line naming the first model flag in which the checkpoint's backbone differs."""
    theirs = model_signature(saved.transformer_config())
    for key, value in model_signature(transformer).items():
        if key not in _FREE_KEYS and theirs[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"the checkpoint in {saved.root} has {flag} {theirs[key]}, this run {value}; "
                             f"pass the model flags of the run that saved it")


@torch.no_grad()
def load_weights(model: ScalarHeadGPT, saved: SavedCheckpoint, ps: ParallelState, *, with_head: bool) -> None:
    """Every parameter of `model` from `saved` at `ps`'s tensor-parallel size; the head only
    `with_head` (a GPT checkpoint's LM head is another layer)."""
    same_tp = saved.metadata["layout"]["tp"] == ps.tp_size
    weights = saved.read_weights([ps.tp_rank] if same_tp else None)
    layouts = layouts_of(model)
    for name, param in checkpointing.named_global_params(model, global_name).items():
        if name.startswith(HEAD + ".") and not with_head:
            continue
        layout = layouts[param]
        tensor = weights.local(name, layout, ps.tp_rank, ps.tp_size)
        if name == "embedding.word_embeddings.weight" and tuple(tensor.shape) != tuple(param.shape):
            tensor = layout.shard(_fit_rows(weights.full(name), layout.full_shape(param.shape, ps.tp_size)[0]),
                                  ps.tp_rank, ps.tp_size)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{saved.root}: {name} has shape {tuple(tensor.shape)}, this model needs "
                             f"{tuple(param.shape)}; pass the model flags of the run that saved it")
        if is_fp8_param(param):
            set_param_value(param, tensor.to(device=param.device))
        else:
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def _fit_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """The word embedding padded to another vocabulary size (padding rows are never looked up):
    the real rows kept, padding rows cut or added as zeros."""
    if full.shape[0] >= rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


def load_reward_model_for_inference(load_dir: str | Path, ps: ParallelState, *, fp8_level: str = "none",
                                    params_dtype: torch.dtype | None = None,
                                    fp8_settings: dict | None = None) -> LoadedModel:
    """The latest reward-model checkpoint in `load_dir` as this rank's shard of a frozen, eval-mode
    `ScalarHeadGPT` at `ps`'s tensor-parallel size (pipeline size 1): PPO's reward model, a
    critic's starting point. `fp8_level`, `params_dtype` and `fp8_settings` (casting flags that
    replace the saved run's) as `load_gpt_for_inference` takes them (O3: FP8 weights)."""
    if ps.pp_size > 1:
        raise ValueError(f"a frozen reward model is whole on every rank, but the pipeline size is {ps.pp_size}; "
                         f"use --pipeline-model-parallel-size 1")
    if fp8_level not in LEVELS:
        raise ValueError(f"unknown FP8 level {fp8_level!r}; use one of {', '.join(LEVELS)}")
    saved = open_checkpoint(load_dir)
    if not is_reward_model_checkpoint(saved):
        raise ValueError(f"{load_dir} holds a GPT checkpoint, not a reward model's; train one with "
                         f"rlhf/train_reward_model.py --pretrained-checkpoint {load_dir}")
    config = replace(saved.transformer_config(params_dtype), recompute_granularity=None, recompute_method=None,
                     recompute_num_layers=None)
    check_tensor_parallel_fits(config, ps.tp_size)
    model = ScalarHeadGPT(config, device="meta")
    parallelize_scalar_head_gpt(model, ps)
    materialize(model, ps.device)
    apply_inference_precision(model, inference_fp8_config(dict(saved.args, **(fp8_settings or {})), fp8_level, None))
    load_weights(model, saved, ps, with_head=True)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, config=config, args=dict(saved.args), iteration=saved.iteration,
                       fp8_level=saved.fp8_level)
