"""GPT: embeddings, a pre-norm transformer block, the output head and the loss.

Single-device code. Layout and precision are applied from outside: `megatron.core.parallelize`
swaps the linears and embeddings for tensor-parallel ones and `megatron.core.precision` gives
their GEMMs FP8 state. This file has no parallel or FP8 branches.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.core.tensor_parallel.layout import LaidOut, ParamLayout
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import TransformerBlock


class CrossEntropy(nn.Module):
    """The model's output distribution over its vocabulary, the first `vocab_size` of the V logit
    columns (the rest are rows that pad the output layer and are no part of it): the per-token
    loss from [s, b, V] logits and [s, b] labels, and the logits with the padding columns at -inf.
    The tensor-parallel plan swaps this for the vocab-parallel version."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        wide = logits[..., :self.vocab_size].to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(wide.flatten(0, 1), labels.flatten(), reduction="none")
        return loss.view_as(labels)

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [..., V] with the padding columns set to -inf (a copy; `logits` when unpadded)."""
        return mask_columns_from(logits, self.vocab_size)


def mask_columns_from(logits: torch.Tensor, first: int) -> torch.Tensor:
    """`logits` with columns `first`.. of the last dimension at -inf (a copy; `logits` itself when
    there are none): their softmax probability is exactly 0."""
    if first >= logits.shape[-1]:
        return logits
    padding = torch.arange(logits.shape[-1], device=logits.device) >= max(first, 0)
    return logits.masked_fill(padding, float("-inf"))


class LanguageModelEmbedding(nn.Module):
    def __init__(self, config: TransformerConfig, device=None):
        super().__init__()
        kw = dict(device=device, dtype=config.params_dtype)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, **kw)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """[b, s] token ids -> [s, b, h]."""
        embeddings = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(embeddings.transpose(0, 1).contiguous())


class GPTModel(nn.Module, LaidOut):
    """A GPT, or the part of one that a pipeline stage holds.

    `pre_process` / `post_process`: whether this part holds the embedding / the final norm, head
    and loss. `first_layer`, `num_layers`: which transformer layers (global numbering).
    With labels, `forward` returns the per-token loss [b, s]; without, the logits [b, s, V], whose
    columns past the vocabulary (`config.unpadded_vocab_size`: padding rows) are -inf.
    """

    def __init__(self, config: TransformerConfig, *, pre_process: bool = True, post_process: bool = True,
                 first_layer: int = 0, num_layers: int | None = None, device=None):
        super().__init__()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.embedding = LanguageModelEmbedding(config, device) if pre_process else None
        self.decoder = TransformerBlock(config, first_layer, num_layers, post_process, device)
        self.output_layer = None
        if post_process:
            self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                          device=device, dtype=config.params_dtype)
            self.cross_entropy = CrossEntropy(config.unpadded_vocab_size)
        self.tie_output_weight()
        self.input_tensor: torch.Tensor | None = None
        # Every parameter replicated on one device; `parallelize_gpt` records the parallel layout.
        self.param_layouts: dict[str, ParamLayout] = {}

    @property
    def shares_embeddings_and_output_weights(self) -> bool:
        return not self.config.untie_embeddings_and_output_weights

    def tie_output_weight(self) -> None:
        """Point the head at the word embeddings when they are tied and both live here (call
        again after anything replaces either module or its parameters)."""
        if self.shares_embeddings_and_output_weights and self.embedding is not None and self.output_layer is not None:
            self.output_layer.weight = self.embedding.word_embeddings.weight

    def head_output(self, logits: torch.Tensor) -> torch.Tensor:
        """What `forward` returns without labels, from the output layer's [s, b, V] logits: the
        padding columns at -inf, so that any softmax of them is the model's distribution."""
        return self.cross_entropy.mask_padding(logits)

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """The previous stage's output for the next `forward` of a part without the embedding.
        A pipeline schedule sets it, so the caller's `forward(input_ids, labels)` is the same on
        every stage."""
        self.input_tensor = input_tensor

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                hidden_states: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, kv_cache=None, last_only: bool = False):
        """`input_ids` [b, s] on the first stage; `hidden_states` [s, b, h] (or the tensor given to
        `set_input_tensor`) otherwise. Returns hidden states when this part has no head.

        Packed sequences (supervised fine-tuning): `position_ids` [b, s] restart at each sample and
        `segment_ids` [b, s] number the samples; attention stays within each sample. Every
        pipeline stage takes them (the rotary embedding and the attention mask need them).

        Generation (`megatron.core.inference`): with `kv_cache`, `input_ids` are the positions
        after those cached (the caller advances the cache); `last_only` computes the logits of
        the last position only, [b, 1, V]."""
        if self.pre_process:
            if kv_cache is not None and position_ids is None:
                position_ids = torch.arange(kv_cache.length, kv_cache.length + input_ids.shape[1],
                                            device=input_ids.device)[None, :]
            hidden_states = self.embedding(input_ids, position_ids)
        elif hidden_states is None:
            hidden_states = self.input_tensor
        packed = segment_ids is not None
        hidden_states = self.decoder(hidden_states, kv_cache, position_ids if packed else None, segment_ids)
        if not self.post_process:
            return hidden_states
        if last_only:
            hidden_states = hidden_states[-1:]
        logits = self.output_layer(hidden_states)
        if labels is None:
            return self.head_output(logits).transpose(0, 1)
        return self.cross_entropy(logits, labels.t().contiguous()).t()
