"""Parameter layouts: one typed record per parameter, kept by the model, nothing on the parameters."""

from __future__ import annotations

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.precision import FP8Config, apply_precision
from megatron.core.tensor_parallel.layout import REPLICATED, ParamLayout, layouts_of
from megatron.core.transformer.config import TransformerConfig


def fake_tp_ps(tp_size: int, tp_rank: int) -> ParallelState:
    """Enough of a ParallelState to lay out one tensor-parallel rank on one process (no collectives)."""
    return ParallelState(world_size=tp_size, rank=tp_rank, tp_size=tp_size, pp_size=1, dp_size=1, tp_rank=tp_rank,
                         pp_rank=0, dp_rank=0, device=torch.device("cpu"), backend=None)


def swiglu_config(**overrides) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
                hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", swiglu=True,
                position_embedding_type="learned_absolute")
    return TransformerConfig(**{**base, **overrides})


def test_gpt_layouts_under_tensor_and_sequence_parallelism():
    model = GPTModel(swiglu_config(), device="meta")
    parallelize_gpt(model, fake_tp_ps(2, 1), sequence_parallel=True)
    initialize_parameters(model, fake_tp_ps(2, 1), seed=3, device="cpu")  # new parameter objects: layouts hold
    layouts = layouts_of(model)
    layer = model.decoder.layers[1]
    assert layouts[layer.self_attention.linear_qkv.weight] == ParamLayout(tp_dim=0)
    assert layouts[layer.self_attention.linear_proj.weight] == ParamLayout(tp_dim=1, scaled_init=True)
    assert layouts[layer.mlp.linear_fc1.weight] == ParamLayout(tp_dim=0, tp_parts=2)  # [gate; up]
    assert layouts[layer.mlp.linear_fc2.weight] == ParamLayout(tp_dim=1, scaled_init=True)
    assert layouts[layer.mlp.linear_fc2.bias] == ParamLayout(sequence_parallel=True)  # added after the reduce-scatter
    assert layouts[model.embedding.word_embeddings.weight] == ParamLayout(tp_dim=0)
    assert layouts[model.embedding.position_embeddings.weight] == REPLICATED
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(layouts[p] == ParamLayout(sequence_parallel=True) for p in norms)
    # Each split parameter's full shape is the config's.
    fc1 = layer.mlp.linear_fc1.weight
    assert layouts[fc1].full_shape(fc1.shape, 2) == (2 * model.config.ffn_hidden_size, 32)


def test_shard_splits_fused_blocks_separately():
    full = torch.arange(8.0).reshape(8, 1)  # [gate 0..3; up 4..7]
    layout = ParamLayout(tp_dim=0, tp_parts=2)
    assert layout.shard(full, 0, 2).flatten().tolist() == [0, 1, 4, 5]
    assert layout.shard(full, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    assert REPLICATED.shard(full, 1, 2) is full
    with pytest.raises(ValueError, match="tensor-model-parallel-size"):
        ParamLayout(tp_dim=0, tp_parts=3).shard(full, 0, 2)


def test_norm_counting_rule():
    assert ParamLayout(tp_dim=0).counts_in_norm(1)
    assert REPLICATED.counts_in_norm(0) and not REPLICATED.counts_in_norm(1)
    assert not ParamLayout(tp_dim=0, tied_embedding=True, tied_duplicate=True).counts_in_norm(0)


@pytest.mark.parametrize("level", ["none", "O1", "O3"])
def test_nothing_rides_on_parameters(level):
    """The layout and the precision plan are values: a laid-out, initialised model at any level
    leaves no attributes on its parameters beyond what their types declare."""
    ps = ParallelState.single()
    model = GPTModel(swiglu_config(), device="meta")
    parallelize_gpt(model, ps, sequence_parallel=False)
    initialize_parameters(model, ps, seed=3, device="cpu")
    apply_precision(model, FP8Config(level=level, recipe="current", min_features=16), ps)
    for name, param in model.named_parameters():
        declared = {"scale", "cast"} if type(param) is not torch.nn.Parameter else set()
        assert set(vars(param)) <= declared, (name, type(param).__name__, sorted(vars(param)))
