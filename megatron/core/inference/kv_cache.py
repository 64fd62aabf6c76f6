"""The key/value cache of incremental decoding.

One buffer of keys and one of values per transformer layer, [max_length, batch, groups, head
dim] in the model's dtype, holding this rank's key/value heads (a tensor-parallel rank holds its
query groups only). A forward pass with the cache attends its new tokens to everything cached
before them, appends their keys and values, and advances `length` once the whole model has run.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the tokens seen so far, for `batch` sequences of up to `max_length`."""

    def __init__(self, num_layers: int, max_length: int, batch: int, groups: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str, first_layer: int = 0):
        shape = (max_length, batch, groups, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.first_layer = first_layer
        self.max_length = max_length
        self.length = 0  # tokens cached (the position of the next token)

    @classmethod
    def for_model(cls, model, batch: int, max_length: int) -> KVCache:
        """A cache for `model` (a GPTModel, possibly a tensor-parallel shard) of `batch` sequences."""
        config = model.config
        layers = model.decoder.layers
        qkv_width = layers[0].self_attention.linear_qkv.weight.shape[0]
        groups = qkv_width // ((config.heads_per_group + 2) * config.kv_channels)
        return cls(len(layers), max_length, batch, groups, config.kv_channels,
                   dtype=config.params_dtype, device=layers[0].self_attention.linear_qkv.weight.device,
                   first_layer=model.decoder.first_layer)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, per sequence (all layers, keys and values, this rank)."""
        return self.nbytes // (self.max_length * self.keys[0].shape[1]) if self.keys else 0

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `key`, `value` [s, b, groups, d] of the new tokens (at positions `length` ..
        `length + s - 1`) for global layer `layer_number`; returns all keys and values so far."""
        start, end = self.length, self.length + key.shape[0]
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} tokens; {end} were asked for (raise its "
                             "max_length, at most --max-position-embeddings)")
        index = layer_number - self.first_layer
        self.keys[index][start:end] = key
        self.values[index][start:end] = value
        return self.keys[index][:end], self.values[index][:end]

    def advance(self, tokens: int) -> None:
        self.length += tokens
