"""Pre-norm GPT transformer layer and block. Single-device code: activations are
[sequence, batch, hidden] as in Megatron; tensor and sequence parallelism are applied from
outside by swapping the linears (see megatron.core.parallelize), so nothing here branches on
the layout. Shapes of heads are read from the linears' actual output widths, which is what makes
the same code run on a tensor-parallel shard."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.rope import apply_rotary, rotary_tables


def _tracker_contexts(tracker):
    """Checkpoint contexts that replay the tensor-parallel RNG stream in the recomputation
    (torch's checkpoint restores only the default generators)."""
    saved = {}

    @contextlib.contextmanager
    def forward():
        saved["states"] = tracker.get_states()
        yield

    @contextlib.contextmanager
    def recompute():
        current = tracker.get_states()
        tracker.set_states(saved["states"])
        try:
            yield
        finally:
            tracker.set_states(current)

    return forward(), recompute()


def recomputed(fn, *args, tracker=None):
    """`fn(*args)` whose activations are recomputed in backward instead of kept."""
    context_fn = (lambda: _tracker_contexts(tracker)) if tracker is not None else None
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def attach_rng_tracker(model: nn.Module, tracker) -> None:
    """Hand the tensor-parallel RNG tracker to the modules that recompute activations."""
    for module in model.modules():
        if isinstance(module, (SelfAttention, TransformerBlock)):
            module.rng_tracker = tracker


def make_norm(config: TransformerConfig, device=None) -> nn.Module:
    kwargs = dict(eps=config.layernorm_epsilon, device=device, dtype=config.params_dtype)
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, **kwargs)
    return nn.LayerNorm(config.hidden_size, **kwargs)


class SelfAttention(nn.Module):
    """Causal multi-head or grouped-query attention through scaled_dot_product_attention.

    The fused QKV projection is laid out group by group: for each query group its query heads,
    then its key head, then its value head. A contiguous split of the output rows therefore
    hands each tensor-parallel rank whole groups.
    """

    def __init__(self, config: TransformerConfig, device=None):
        super().__init__()
        self.config = config
        kw = dict(bias=config.add_bias_linear, device=device, dtype=config.params_dtype)
        self.linear_qkv = nn.Linear(config.hidden_size, config.qkv_width, **kw)
        self.linear_proj = nn.Linear(config.num_attention_heads * config.kv_channels, config.hidden_size, **kw)
        # Set by the parallelize step to fork the tensor-parallel RNG (heads differ per rank).
        self.rng_context = contextlib.nullcontext
        self.rng_tracker = None
        self.recompute_core_attention = config.recompute_granularity == "selective"
        self._rotary_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def rotary(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE tables for positions 0 .. seq_len - 1 (the QKV projection has gathered the whole
        sequence by now); a table's rows do not depend on its length."""
        cfg = self.config
        if cfg.position_embedding_type != "rope":
            return None
        key = (seq_len, device)
        if self._rotary_cache is None or self._rotary_cache[0] != key:
            self._rotary_cache = (key, rotary_tables(seq_len, cfg.kv_channels, cfg.rotary_base, device))
        return self._rotary_cache[1]

    def forward(self, x: torch.Tensor, kv_cache=None, layer_number: int = 0, position_ids=None,
                attention_mask=None) -> torch.Tensor:
        """`kv_cache` (`megatron.core.inference.KVCache`): `x` holds the tokens after those cached,
        which its queries attend to as well; their keys and values join the cache under
        `layer_number`. Packed sequences (`megatron.core.datasets.sft_dataset`): `position_ids`
        [b, s] place each token for the rotary embedding (restarting per sample) and a token
        attends only to the keys `attention_mask` allows (`packed_attention_mask`)."""
        cfg = self.config
        qkv = self.linear_qkv(x)
        seq, batch, width = qkv.shape
        per_group = cfg.heads_per_group + 2
        groups = width // (per_group * cfg.kv_channels)
        qkv = qkv.view(seq, batch, groups, per_group, cfg.kv_channels)
        query = qkv[:, :, :, : cfg.heads_per_group].reshape(seq, batch, groups * cfg.heads_per_group, cfg.kv_channels)
        key, value = qkv[:, :, :, -2], qkv[:, :, :, -1]
        offset = kv_cache.length if kv_cache is not None else 0
        if position_ids is not None and cfg.position_embedding_type == "rope":
            tables = self.rotary(max(cfg.max_position_embeddings, int(position_ids.max()) + 1), qkv.device)
            # [b, s] positions -> [s, b, 1, d] tables, one row per token
            rotary = tuple(table[:, 0, 0][position_ids.t()][:, :, None, :] for table in tables)
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        else:
            rotary = self.rotary(seq if kv_cache is None else kv_cache.max_length, qkv.device)
            if rotary is not None:
                rotary = tuple(table[offset:offset + seq] for table in rotary)
                query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if kv_cache is not None:
            key, value = kv_cache.update(layer_number, key, value)
        # [s, b, n, d] -> [b, n, s, d]; each key/value head serves heads_per_group query heads.
        query = query.permute(1, 2, 0, 3)
        key = key.permute(1, 2, 0, 3).repeat_interleave(cfg.heads_per_group, dim=1)
        value = value.permute(1, 2, 0, 3).repeat_interleave(cfg.heads_per_group, dim=1)
        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            context = recomputed(self._core_attention, query, key, value, offset, attention_mask,
                                 tracker=self.rng_tracker)
        else:
            context = self._core_attention(query, key, value, offset, attention_mask)
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, -1)
        return self.linear_proj(context)

    def _core_attention(self, query, key, value, offset: int = 0, mask=None):
        """Softmax(QK^T) V with dropout: what selective recomputation recomputes (cheap to
        redo, large to keep: the scores are s x s per head). Query i sits at position
        `offset + i` and sees keys 0 .. offset + i; or, with a boolean `mask`, the keys it allows."""
        dropout = self.config.attention_dropout if self.training else 0.0
        causal = offset == 0 and mask is None
        if offset and query.shape[2] > 1:  # several new tokens after cached ones
            positions = torch.arange(key.shape[2], device=query.device)
            mask = positions[None, :] <= offset + torch.arange(query.shape[2], device=query.device)[:, None]
        with self.rng_context():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=causal)


def packed_attention_mask(segment_ids: torch.Tensor | None) -> torch.Tensor | None:
    """[b, 1, s, s] booleans, True where a query may attend: earlier (or the same) positions of its
    own segment. None without `segment_ids`."""
    if segment_ids is None:
        return None
    seq = segment_ids.shape[1]
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return same & torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()


class MLP(nn.Module):
    """GeLU MLP, or SwiGLU when config.swiglu (fc1 then produces [gate; up])."""

    def __init__(self, config: TransformerConfig, device=None):
        super().__init__()
        self.swiglu = config.swiglu
        kw = dict(bias=config.add_bias_linear, device=device, dtype=config.params_dtype)
        fc1_width = 2 * config.ffn_hidden_size if config.swiglu else config.ffn_hidden_size
        self.linear_fc1 = nn.Linear(config.hidden_size, fc1_width, **kw)
        self.linear_fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_fc1(x)
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return self.linear_fc2(hidden)


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig, layer_number: int, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = make_norm(config, device)
        self.self_attention = SelfAttention(config, device)
        self.pre_mlp_layernorm = make_norm(config, device)
        self.mlp = MLP(config, device)
        # Set by the parallelize step: under sequence parallelism each rank drops different tokens.
        self.rng_context = contextlib.nullcontext

    def _dropout_add(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        with self.rng_context():
            return residual + F.dropout(update, p=self.hidden_dropout, training=self.training)

    def forward(self, x: torch.Tensor, kv_cache=None, position_ids=None, attention_mask=None) -> torch.Tensor:
        attention = self.self_attention(self.input_layernorm(x), kv_cache, self.layer_number, position_ids,
                                        attention_mask)
        x = self._dropout_add(x, attention)
        return self._dropout_add(x, self.mlp(self.pre_mlp_layernorm(x)))


class TransformerBlock(nn.Module):
    """Layers `first_layer .. first_layer + num_layers - 1` of the model (global numbering, so
    a pipeline stage holding a slice names and seeds its layers as the whole model would), and
    the final norm when `post_process`."""

    def __init__(self, config: TransformerConfig, first_layer: int = 0, num_layers: int | None = None,
                 post_process: bool = True, device=None):
        super().__init__()
        count = config.num_layers - first_layer if num_layers is None else num_layers
        self.first_layer = first_layer
        self.recompute = (config.recompute_method, config.recompute_num_layers) \
            if config.recompute_granularity == "full" else None
        self.layers = nn.ModuleList(TransformerLayer(config, first_layer + i, device) for i in range(count))
        self.final_layernorm = make_norm(config, device) if post_process else None
        self.rng_tracker = None  # set by the parallelize step, for recomputation

    def _run(self, start: int, end: int, position_ids=None, attention_mask=None):
        def run(x):
            for layer in self.layers[start:end]:
                x = layer(x, None, position_ids, attention_mask)
            return x
        return run

    def forward(self, x: torch.Tensor, kv_cache=None, position_ids=None, segment_ids=None) -> torch.Tensor:
        """`position_ids`, `segment_ids` [b, s]: packed sequences (see `SelfAttention.forward`); the
        attention mask is built once here for every layer."""
        mask = packed_attention_mask(segment_ids)
        if kv_cache is not None:
            for layer in self.layers:
                x = layer(x, kv_cache)
        elif self.recompute is None or not (self.training and torch.is_grad_enabled()):
            x = self._run(0, len(self.layers), position_ids, mask)(x)
        elif self.recompute[0] == "uniform":  # every chunk of N layers, keeping only its input
            chunk = self.recompute[1]
            for start in range(0, len(self.layers), chunk):
                x = recomputed(self._run(start, start + chunk, position_ids, mask), x, tracker=self.rng_tracker)
        else:  # "block": the first N layers of this stage one by one, the rest kept
            for index in range(len(self.layers)):
                run = self._run(index, index + 1, position_ids, mask)
                x = recomputed(run, x, tracker=self.rng_tracker) if index < self.recompute[1] else run(x)
        return self.final_layernorm(x) if self.final_layernorm is not None else x
