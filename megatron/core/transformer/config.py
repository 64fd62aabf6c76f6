"""TransformerConfig: the shape of a GPT model, independent of how it is laid out or cast."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
# Fields whose flag has another name (the rest are --field-name).
_FLAG_NAMES = {"layernorm_epsilon": "--norm-epsilon", "num_query_groups": "--num-query-groups",
               "add_bias_linear": "--disable-bias-linear"}


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


@dataclass(kw_only=True)
class TransformerConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # rows of the word embedding and output layer (padded for tensor parallelism)
    max_position_embeddings: int
    # The model's vocabulary: ids below it. Rows past it only pad the embedding and output layer to
    # a multiple of --make-vocab-size-divisible-by x TP; they are no part of the output distribution
    # (excluded from every softmax) and never sampled. None: every row is the vocabulary's.
    unpadded_vocab_size: int | None = None
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    swiglu: bool = False
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    params_dtype: torch.dtype = torch.float32
    recompute_granularity: str | None = None  # None, "full" or "selective"
    recompute_method: str | None = None       # "uniform" or "block", with "full"
    recompute_num_layers: int | None = None

    def __post_init__(self):
        self._check_types_and_ranges()
        if self.unpadded_vocab_size is None:
            self.unpadded_vocab_size = self.vocab_size
        if self.unpadded_vocab_size > self.vocab_size:
            raise ValueError(f"the vocabulary ({self.unpadded_vocab_size} ids) has more ids than the model's "
                             f"{self.vocab_size} embedding rows")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"--hidden-size ({self.hidden_size}) must be divisible by "
                                 f"--num-attention-heads ({self.num_attention_heads}), or set --kv-channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                             f"--num-query-groups ({self.num_query_groups})")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown --normalization {self.normalization!r}; use one of {NORMALIZATIONS}")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(f"unknown --position-embedding-type {self.position_embedding_type!r}; "
                             f"use one of {POSITION_EMBEDDINGS}")
        if self.position_embedding_type == "rope" and self.kv_channels % 2:
            raise ValueError(f"RoPE needs an even head dimension, got --kv-channels {self.kv_channels}")
        self._check_recompute()

    def _check_types_and_ranges(self) -> None:
        """Each value of the right type and range, named by its flag (a YAML file can give anything)."""
        counts = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
                  "ffn_hidden_size", "num_query_groups", "kv_channels", "recompute_num_layers", "unpadded_vocab_size")
        for name in counts:
            value = getattr(self, name)
            if value is None and name not in counts[:5]:
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{_flag(name)} must be a whole number, got {value!r}")
            if value <= 0:
                raise ValueError(f"{_flag(name)} must be positive, got {value}")
        reals = {"layernorm_epsilon": "> 0", "rotary_base": "> 0", "init_method_std": ">= 0",
                 "hidden_dropout": "in [0, 1)", "attention_dropout": "in [0, 1)"}
        for name, bound in reals.items():
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
            ok = {"> 0": value > 0, ">= 0": value >= 0, "in [0, 1)": 0.0 <= value < 1.0}[bound]
            if not ok:
                raise ValueError(f"{_flag(name)} must be {bound}, got {value}")
        for name in ("swiglu", "add_bias_linear", "untie_embeddings_and_output_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_flag(name)} is a switch (true or false), got {getattr(self, name)!r}")
        if not isinstance(self.params_dtype, torch.dtype) or not self.params_dtype.is_floating_point:
            raise ValueError(f"params_dtype must be a floating-point torch.dtype, got {self.params_dtype!r}")

    def _check_recompute(self) -> None:
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"unknown --recompute-granularity {self.recompute_granularity!r}; use full or selective")
        if self.recompute_granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1
        elif self.recompute_method is not None:
            raise ValueError("--recompute-method applies to --recompute-granularity full only")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_width(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def num_parameters(self) -> int:
        """Parameters of the full (unsharded) model."""
        h, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        bias = self.add_bias_linear
        qkv = h * self.qkv_width + (self.qkv_width if bias else 0)
        proj = self.num_attention_heads * self.kv_channels * h + (h if bias else 0)
        fc1_width = 2 * f if self.swiglu else f
        mlp = h * fc1_width + f * h + ((fc1_width + h) if bias else 0)
        norm = h if self.normalization == "RMSNorm" else 2 * h
        per_layer = qkv + proj + mlp + 2 * norm
        embed = self.vocab_size * h
        if self.position_embedding_type == "learned_absolute":
            embed += self.max_position_embeddings * h
        output = self.vocab_size * h if self.untie_embeddings_and_output_weights else 0
        return layers * per_layer + norm + embed + output
