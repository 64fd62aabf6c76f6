"""The planner's account of activations (`tools/plan.py`): the bytes autograd keeps per layer and
micro-batch on a pipeline stage, with and without recomputation, from the layers `Stage` builds.
Checked against the tensors autograd actually saves in tests/test_plan.py."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tools.plan import Stage


def _saved_input(stage: Stage, module, tokens: int, width: int, column: bool) -> float:
    """Bytes a tensor-parallel linear keeps of its input for backward."""
    e = stage.config.precision.params_dtype.itemsize
    t, sp = stage.layout.tp, stage.layout.sp
    local = tokens / t if (column and sp) else tokens  # a column layer's input is sequence-sharded under SP
    if id(module) not in stage.fp8_modules:
        return local * width * e
    if column and sp and not stage.plan.fp8_tp_comm:  # O0-O2: the gathered input, cast whole
        return tokens * width
    return local * width


def norm_bytes(stage: Stage, tokens: float) -> float:
    """What a norm keeps: its input and FP32 statistics (LayerNorm), or PyTorch's composite RMSNorm's
    FP32 input and FP32 normalized output."""
    m = stage.config.model
    if m.normalization == "RMSNorm":
        return tokens * (8 * m.hidden_size + 4)
    return tokens * (m.hidden_size * stage.config.precision.params_dtype.itemsize + 8)


def layer_activation_bytes(stage: Stage, layer, recompute: str | None) -> float:
    """What autograd keeps for one transformer layer and micro-batch (see the module docstring)."""
    cfg, m = stage.config, stage.config.model
    e, t, sp = cfg.precision.params_dtype.itemsize, stage.layout.tp, stage.layout.sp
    s, b, h = cfg.data.seq_length, stage.layout.mbs, m.hidden_size
    f = m.ffn_hidden_size or 4 * h
    tokens = s * b
    heads = m.num_attention_heads // t
    attn_width = heads * (m.kv_channels or h // m.num_attention_heads)
    attn, mlp = layer.self_attention, layer.mlp
    total = 2 * norm_bytes(stage, tokens / t if sp else tokens)
    total += _saved_input(stage, attn.linear_qkv, tokens, h, True) + 3 * tokens * attn_width * e  # Q, K, V
    if m.position_embedding_type != "rope" and m.query_groups == m.num_attention_heads:
        total += 2 * tokens * attn_width * e  # Q is then a view of the QKV output and keeps all of it
    proj_input = _saved_input(stage, attn.linear_proj, tokens, attn_width, False)
    if recompute == "selective":  # the checkpoint keeps Q, K, V; its output is the projection's input
        total += proj_input
    elif cfg.model.attention_backend in ("unfused", "local"):  # probabilities (and dropout's mask, output)
        total += b * heads * s * s * (e + (1 + e if m.attention_dropout > 0 else 0)) + proj_input
    else:  # flash: output and log-sum-exp; the output is the projection's input unless cast to FP8
        output = tokens * attn_width * e
        total += output + 4 * b * heads * s + (proj_input if id(attn.linear_proj) in stage.fp8_modules else 0)
    total += _saved_input(stage, mlp.linear_fc1, tokens, h, True)
    total += tokens * (f // t) * e * (3 if m.swiglu else 1)  # GeLU's input; SwiGLU's FC1 and SiLU outputs
    total += _saved_input(stage, mlp.linear_fc2, tokens, f // t, False)
    if m.hidden_dropout > 0:
        total += 2 * (tokens / t if sp else tokens) * h  # 1-byte masks (CUDA's fused dropout)
    return total


def activations(stage: Stage, recompute: str | None, method: str | None = None,
                recompute_layers: int | None = None) -> tuple[float, float]:
    """(what autograd keeps at the peak, what lives only for one chunk or loss step) on this stage:
    the micro-batches in flight, the loss step's logits, a recomputed chunk."""
    cfg = stage.config
    e, t = cfg.precision.params_dtype.itemsize, stage.layout.tp
    tokens = cfg.data.seq_length * stage.layout.mbs
    seq_tokens = tokens / t if stage.layout.sp else tokens
    boundary = seq_tokens * cfg.model.hidden_size * e  # a layer's input
    per_chunk, transient = [], 0.0
    for chunk in stage.chunks:
        layers = list(chunk.decoder.layers)
        layer = layer_activation_bytes(stage, layers[0], recompute) if layers else 0.0
        count, kept = len(layers), 0.0
        if recompute == "full":
            group = min(recompute_layers or 1, count)
            if method == "block":
                kept, transient = group * boundary + (count - group) * layer, max(transient, layer)
            else:
                kept, transient = math.ceil(count / group) * boundary, max(transient, group * layer)
        else:
            kept = count * layer
        # A chunk's output sent on is freed once sent (deallocate_output_tensor): only its graph stays.
        if chunk.pre_process:  # SP: the first layer's input is a view that keeps the whole embedding output
            kept += (tokens - seq_tokens) * cfg.model.hidden_size * e
            kept += seq_tokens * cfg.model.hidden_size if cfg.model.hidden_dropout > 0 else 0  # dropout's mask
        per_chunk.append(kept)
    kept = stage.in_flight() * max(per_chunk) + rope_table_bytes(stage)
    if any(c.post_process for c in stage.chunks):  # final norm, head input, FP32 (log-)softmax kept
        vocab = stage.chunks[-1].output_layer.weight.shape[0]
        kept += norm_bytes(stage, seq_tokens) + boundary + 4 * tokens * vocab
        transient += tokens * vocab * (e + 4)  # the logits and their FP32 copy, during the loss step
    return kept, transient


def activation_bytes(stage: Stage, recompute: str | None, method: str | None = None,
                     recompute_layers: int | None = None) -> float:
    return sum(activations(stage, recompute, method, recompute_layers))


def rope_table_bytes(stage: Stage) -> int:
    """Each attention layer's cached RoPE cos / sin tables (FP32, s x head dim), which autograd keeps too."""
    m = stage.config.model
    if m.position_embedding_type != "rope":
        return 0
    layers = sum(len(chunk.decoder.layers) for chunk in stage.chunks)
    return layers * 2 * 4 * stage.config.data.seq_length * (m.kv_channels or m.hidden_size // m.num_attention_heads)
