"""GPT building blocks against straightforward single-device references (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import MLP, SelfAttention
from megatron.core.transformer.rope import apply_rotary, rotary_tables


def config(**overrides):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=96, max_position_embeddings=16,
                ffn_hidden_size=96, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float64)
    base.update(overrides)
    return TransformerConfig(**base)


def test_rope_rotates_each_frequency_pair():
    torch.manual_seed(0)
    seq, dim, base = 7, 8, 10000.0
    x = torch.randn(seq, 2, 3, dim, dtype=torch.float64)
    cos, sin = rotary_tables(seq, dim, base)
    got = apply_rotary(x, cos.double(), sin.double())
    # Reference: pair (i, i + dim/2) as a complex number, rotated by position * base^(-2i/dim).
    half = dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None, :]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)[:, None, None, :]
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # Relative positions: the rotated dot product depends only on the distance.
    q, k = torch.randn(1, 1, 1, dim, dtype=torch.float64), torch.randn(1, 1, 1, dim, dtype=torch.float64)
    qs = apply_rotary(q.expand(seq, 1, 1, dim), cos.double(), sin.double())
    ks = apply_rotary(k.expand(seq, 1, 1, dim), cos.double(), sin.double())
    assert (qs[3] * ks[1]).sum().item() == pytest.approx((qs[5] * ks[3]).sum().item(), rel=1e-6)


def reference_attention(attn: SelfAttention, x: torch.Tensor, cfg: TransformerConfig) -> torch.Tensor:
    """Causal softmax attention written out; the QKV rows are [q heads, k, v] per query group."""
    seq, batch, _ = x.shape
    d, hpg = cfg.kv_channels, cfg.heads_per_group
    w = attn.linear_qkv.weight.view(cfg.num_query_groups, hpg + 2, d, cfg.hidden_size)
    b = attn.linear_qkv.bias.view(cfg.num_query_groups, hpg + 2, d)
    outputs = []
    for head in range(cfg.num_attention_heads):
        group, index = divmod(head, hpg)
        q = x @ w[group, index].t() + b[group, index]
        k = x @ w[group, hpg].t() + b[group, hpg]
        v = x @ w[group, hpg + 1].t() + b[group, hpg + 1]
        if cfg.position_embedding_type == "rope":
            cos, sin = rotary_tables(seq, d, cfg.rotary_base)
            q = apply_rotary(q[:, :, None], cos.double(), sin.double())[:, :, 0]
            k = apply_rotary(k[:, :, None], cos.double(), sin.double())[:, :, 0]
        scores = torch.einsum("sbd,tbd->bst", q, k) / math.sqrt(d)
        mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        outputs.append(torch.einsum("bst,tbd->sbd", probs, v))
    context = torch.cat(outputs, dim=-1)
    return attn.linear_proj(context)


@pytest.mark.parametrize("groups,rope", [(4, False), (2, True), (1, True)])
def test_attention_mha_and_gqa_against_reference(groups, rope):
    torch.manual_seed(0)
    cfg = config(num_query_groups=groups, position_embedding_type="rope" if rope else "learned_absolute")
    attn = SelfAttention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(6, 2, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference_attention(attn, x, cfg), rtol=1e-9, atol=1e-9)


def test_swiglu_and_gelu_mlp():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 64, dtype=torch.float64)
    mlp = MLP(config(swiglu=True))
    gate_w, up_w = mlp.linear_fc1.weight.chunk(2)
    gate_b, up_b = mlp.linear_fc1.bias.chunk(2)
    hidden = F.silu(x @ gate_w.t() + gate_b) * (x @ up_w.t() + up_b)
    torch.testing.assert_close(mlp(x), hidden @ mlp.linear_fc2.weight.t() + mlp.linear_fc2.bias)
    gelu = MLP(config())
    ref = F.gelu(x @ gelu.linear_fc1.weight.t() + gelu.linear_fc1.bias) @ gelu.linear_fc2.weight.t()
    torch.testing.assert_close(gelu(x), ref + gelu.linear_fc2.bias)


def test_rmsnorm_layer_is_rms_normalisation():
    cfg = config(normalization="RMSNorm")
    model = GPTModel(cfg)
    norm = model.decoder.layers[0].input_layernorm
    x = torch.randn(3, 64, dtype=torch.float64)
    ref = x / torch.sqrt(x.square().mean(-1, keepdim=True) + cfg.layernorm_epsilon)
    torch.testing.assert_close(norm(x), ref)


@pytest.mark.parametrize("overrides", [
    {}, {"swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope", "num_query_groups": 2},
    {"untie_embeddings_and_output_weights": True, "add_bias_linear": False},
])
def test_num_parameters_matches_the_model(overrides):
    cfg = config(**overrides)
    assert cfg.num_parameters() == sum(p.numel() for p in GPTModel(cfg).parameters())


def test_model_loss_is_cross_entropy_of_the_logits():
    torch.manual_seed(0)
    model = GPTModel(config())
    ids = torch.randint(0, 96, (2, 10))
    labels = torch.randint(0, 96, (2, 10))
    loss = model(ids, labels)
    logits = model(ids)
    assert loss.shape == (2, 10) and logits.shape == (2, 10, 96)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 96), labels.reshape(-1),
                                                     reduction="none").view(2, 10))
    # Tied head: the output layer is the embedding table.
    assert model.output_layer.weight is model.embedding.word_embeddings.weight


def test_initialisation_follows_megatron():
    cfg = config(num_layers=4, hidden_size=256, ffn_hidden_size=1024, vocab_size=512, params_dtype=torch.float32)
    model = GPTModel(cfg, device="meta")
    ps = ParallelState.single()
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=7)
    layer = model.decoder.layers[1]
    std = cfg.init_method_std
    assert layer.mlp.linear_fc1.weight.std().item() == pytest.approx(std, rel=0.02)
    assert layer.mlp.linear_fc2.weight.std().item() == pytest.approx(std / math.sqrt(2 * 4), rel=0.02)
    assert layer.self_attention.linear_proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.03)
    assert torch.all(layer.mlp.linear_fc1.bias == 0) and torch.all(layer.input_layernorm.weight == 1)
    # Same seed, same weights; another seed, others.
    again = GPTModel(cfg, device="meta")
    parallelize_gpt(again, ps)
    initialize_parameters(again, ps, seed=7)
    assert torch.equal(again.decoder.layers[1].mlp.linear_fc1.weight, layer.mlp.linear_fc1.weight)
    other = GPTModel(cfg, device="meta")
    parallelize_gpt(other, ps)
    initialize_parameters(other, ps, seed=8)
    assert not torch.equal(other.decoder.layers[1].mlp.linear_fc1.weight, layer.mlp.linear_fc1.weight)
    assert model.output_layer.weight is model.embedding.word_embeddings.weight
