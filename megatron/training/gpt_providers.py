"""The GPT pieces that `pretrain_gpt.py` hands the training loop: model, data and the step,
bundled as a `TrainingTask` by `gpt_task`."""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn as nn

from megatron.core.datasets.builder import build_gpt_datasets
from megatron.core.datasets.config import gpt_dataset_config_from_args
from megatron.core.pipeline_parallel.model import build_gpt_stages
from megatron.core.pipeline_parallel.p2p_communication import activation_shape
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name, initialize_parameters, parallelize_gpt
from megatron.core.precision import apply_precision
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import attach_rng_tracker
from megatron.training.arguments import fp8_config_from_args
from megatron.training.metrics import model_flops_per_token
from megatron.training.training import TrainingTask


def transformer_config_from_args(args: argparse.Namespace, vocab_size: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size, max_position_embeddings=args.max_position_embeddings,
        ffn_hidden_size=args.ffn_hidden_size, num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon, swiglu=args.swiglu,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, add_bias_linear=not args.disable_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )


# What a checkpoint must agree on to load into a GPT of this configuration.
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "kv_channels", "vocab_size", "normalization", "swiglu", "position_embedding_type",
              "untie_embeddings_and_output_weights", "add_bias_linear")


def model_signature(config: TransformerConfig) -> dict:
    return {key: getattr(config, key) for key in MODEL_KEYS}


def model_provider(args: argparse.Namespace, ps: ParallelState, rng) -> nn.Module:
    """This rank's part of the GPT (its pipeline stage; a ModuleList of chunks with virtual
    stages): built on the meta device, laid out, initialised, given its precision."""
    config = transformer_config_from_args(args, args.padded_vocab_size)
    chunks = build_gpt_stages(config, ps, device="meta",
                              num_layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage)
    for chunk in chunks:
        parallelize_gpt(chunk, ps, sequence_parallel=args.sequence_parallel, rng=rng)
        attach_rng_tracker(chunk, rng)
        initialize_parameters(chunk, ps, seed=args.seed, device=ps.device)
    model = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
    apply_precision(model, fp8_config_from_args(args))  # once for every chunk: one FP8 gradient store
    return model


def datasets_provider(args: argparse.Namespace, num_samples, *, eod_id: int | None = None):
    return build_gpt_datasets(gpt_dataset_config_from_args(args), num_samples, eod_id=eod_id)


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Mean loss over the tokens the mask keeps."""
    loss = (output.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach()}


def forward_step(data_iterator, model, device: torch.device):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["labels"], position_ids=batch["position_ids"])
    return output, partial(loss_func, batch["loss_mask"])


def gpt_task(args: argparse.Namespace, ps: ParallelState, eod_id: int | None) -> TrainingTask:
    """GPT pretraining as the loop's task (`args.padded_vocab_size` set from the tokenizer)."""
    config = transformer_config_from_args(args, args.padded_vocab_size)
    flops = model_flops_per_token(args.num_layers, args.hidden_size, args.ffn_hidden_size or 4 * args.hidden_size,
                                  args.num_attention_heads, args.num_query_groups, args.seq_length,
                                  args.padded_vocab_size, args.swiglu)
    return TrainingTask(
        model_provider=model_provider, forward_step=partial(forward_step, device=ps.device),
        datasets_provider=partial(datasets_provider, eod_id=eod_id), tokens_per_sample=args.seq_length,
        loss_key="lm loss",
        pipeline_tensor_shape=activation_shape(args.seq_length, args.micro_batch_size, args.hidden_size,
                                               tp_size=ps.tp_size, sequence_parallel=args.sequence_parallel),
        pipeline_dtype=config.params_dtype, flops_per_token=flops, num_params=config.num_parameters(),
        global_name=global_name, model_signature=model_signature(config))
