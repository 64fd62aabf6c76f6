"""The GPT pieces that `pretrain_gpt.py` hands the training loop: model, data and the step,
bundled as a `TrainingTask` by `gpt_task`."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from megatron.core.checkpointing import saved_vocab_size
from megatron.core.datasets.builder import build_gpt_datasets
from megatron.core.pipeline_parallel.model import build_gpt_stages
from megatron.core.pipeline_parallel.p2p_communication import activation_shape
from megatron.core.pipeline_parallel.token_loss import token_denominator, token_mean
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name, initialize_parameters, parallelize_gpt
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import attach_rng_tracker
from megatron.training.config import RunConfig
from megatron.training.metrics import model_flops_per_token
from megatron.training.training import TrainingTask


def transformer_config(config: RunConfig, vocab_size: int, unpadded_vocab_size: int | None = None
                       ) -> TransformerConfig:
    """The GPT of `config`'s model section with `vocab_size` embedding rows, the first
    `unpadded_vocab_size` of them its vocabulary (default: all) (flag names differ from the core
    config's in two places: --norm-epsilon and --disable-bias-linear)."""
    m = config.model
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        vocab_size=vocab_size, unpadded_vocab_size=unpadded_vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        ffn_hidden_size=m.ffn_hidden_size, num_query_groups=m.query_groups, kv_channels=m.kv_channels,
        normalization=m.normalization, layernorm_epsilon=m.norm_epsilon, swiglu=m.swiglu,
        position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std, add_bias_linear=not m.disable_bias_linear,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        params_dtype=config.precision.params_dtype,
        recompute_granularity=m.recompute_granularity, recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
    )


# What a checkpoint must agree on to load into a GPT of this configuration.
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "kv_channels", "vocab_size", "unpadded_vocab_size", "normalization", "swiglu", "position_embedding_type",
              "untie_embeddings_and_output_weights", "add_bias_linear")


def model_signature(config: TransformerConfig) -> dict:
    return {key: getattr(config, key) for key in MODEL_KEYS}


def model_provider(config: RunConfig, ps: ParallelState, rng, *, transformer: TransformerConfig) -> nn.Module:
    """This rank's part of the GPT (its pipeline stage; a ModuleList of chunks with virtual
    stages): built on the meta device, laid out and initialised (the trainer applies precision)."""
    chunks = build_gpt_stages(transformer, ps, device="meta",
                              num_layers_per_virtual_stage=config.parallel.num_layers_per_virtual_pipeline_stage)
    for chunk in chunks:
        parallelize_gpt(chunk, ps, sequence_parallel=config.parallel.sequence_parallel, rng=rng)
        attach_rng_tracker(chunk, rng)
        initialize_parameters(chunk, ps, seed=config.training.seed, device=ps.device)
    return chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)


def datasets_provider(config: RunConfig, num_samples, *, eod_id: int | None = None):
    return build_gpt_datasets(config.data.dataset_config(config.training.seed), num_samples, eod_id=eod_id)


def loss_func(loss_mask: torch.Tensor, denominator: torch.Tensor, output: torch.Tensor):
    """The token losses the mask keeps, summed and divided by `denominator` (`token_denominator`:
    this micro-batch's tokens, or with --calculate-per-token-loss the global batch's per
    micro-batch)."""
    loss = token_mean(output, loss_mask, denominator)
    return loss, {"lm loss": loss.detach()}


def loss_tokens(batch: dict) -> torch.Tensor:
    """The tokens a GPT micro-batch's loss averages over."""
    return batch["loss_mask"].sum()


def forward_step(data_iterator, model, device: torch.device):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["labels"], position_ids=batch["position_ids"])
    return output, partial(loss_func, batch["loss_mask"], token_denominator(batch, batch["loss_mask"]))


def model_vocab_size(config: RunConfig, tokenizer_size: int, start_from: str | None = None) -> int:
    """The vocabulary of the model a run trains: that of the checkpoint it starts from (--load when
    it holds one, else `start_from`: --pretrained-checkpoint), which may have more ids than the
    tokenizer (an imported model's extra rows); the tokenizer's for a model trained from scratch."""
    source, saved = config.checkpoint.load, None
    if source:
        saved = saved_vocab_size(source)
    if saved is None and start_from:
        source, saved = start_from, saved_vocab_size(start_from)
    if saved is None:
        return tokenizer_size
    if tokenizer_size > saved:
        raise ValueError(f"the tokenizer has {tokenizer_size} ids but the model in {source} a vocabulary of only "
                         f"{saved}; pass the --tokenizer-* flags of the run (or import) that made that checkpoint")
    return saved


def gpt_transformer(config: RunConfig, ps: ParallelState, tokenizer_size: int, start_from: str | None = None
                    ) -> TransformerConfig:
    """The run's GPT: vocabulary `model_vocab_size`, padded for this tensor-parallel size."""
    vocab = model_vocab_size(config, tokenizer_size, start_from)
    return transformer_config(config, config.model.padded_vocab_size(vocab, ps.tp_size), vocab)


def gpt_task(config: RunConfig, ps: ParallelState, vocab_size: int, eod_id: int | None, *,
             start_from: str | None = None) -> TrainingTask:
    """GPT pretraining as the loop's task, for a tokenizer of `vocab_size` ids, the model's
    vocabulary `model_vocab_size` (padded here); `start_from`: the checkpoint whose weights the
    run starts from when --load holds none (--pretrained-checkpoint)."""
    transformer = gpt_transformer(config, ps, vocab_size, start_from)
    m = config.model
    flops = model_flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size or 4 * m.hidden_size,
                                  m.num_attention_heads, m.query_groups, config.data.seq_length,
                                  transformer.vocab_size, m.swiglu)
    return TrainingTask(
        model_provider=partial(model_provider, transformer=transformer),
        forward_step=partial(forward_step, device=ps.device),
        datasets_provider=partial(datasets_provider, eod_id=eod_id), tokens_per_sample=config.data.seq_length,
        loss_key="lm loss", loss_tokens=loss_tokens,
        pipeline_tensor_shape=activation_shape(config.data.seq_length, config.training.micro_batch_size,
                                               m.hidden_size, tp_size=ps.tp_size,
                                               sequence_parallel=config.parallel.sequence_parallel),
        pipeline_dtype=transformer.params_dtype, flops_per_token=flops, num_params=transformer.num_parameters(),
        global_name=global_name,
        # "head": what --load checks beyond the shape, so a reward model's checkpoint (a scalar head)
        # is not resumed as a GPT (checkpoints written before the key existed still load).
        model_signature=dict(model_signature(transformer), head="lm"))
