"""Activation recomputation (full uniform / block, selective) gives the gradients of no
recomputation, dropout included, on one process and under tensor + sequence parallelism."""

import pytest
import torch

from distributed import run_distributed
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import attach_rng_tracker

MODES = [dict(), dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
         dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
         dict(recompute_granularity="selective")]


def grads_with(ps: ParallelState, mode: dict, sequence_parallel: bool = False):
    config = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=128,
                               max_position_embeddings=16, ffn_hidden_size=128, hidden_dropout=0.2,
                               attention_dropout=0.2, **mode)
    rng = model_parallel_seed(ps, 5)
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps, sequence_parallel=sequence_parallel, rng=rng)
    attach_rng_tracker(model, rng)
    initialize_parameters(model, ps, seed=5)
    tokens = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(3))
    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recomputation_matches_no_recomputation():
    ref_loss, ref_grads = grads_with(ParallelState.single(), MODES[0])
    for mode in MODES[1:]:
        loss, grads = grads_with(ParallelState.single(), mode)
        assert loss == ref_loss
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=lambda m: f"{mode} {name}: {m}")


def test_recompute_flags_are_checked():
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, max_position_embeddings=16)
    with pytest.raises(ValueError, match="needs --recompute-method"):
        TransformerConfig(**base, recompute_granularity="full")
    with pytest.raises(ValueError, match="full only"):
        TransformerConfig(**base, recompute_granularity="selective", recompute_method="block")


def tp_worker(rank, world_size):
    ps = ParallelState.build(2, 1)
    return [grads_with(ps, mode, sequence_parallel=True) for mode in MODES]


@pytest.mark.distributed
def test_recomputation_replays_tensor_parallel_dropout():
    for rank_results in run_distributed(tp_worker, 2):
        ref_loss, ref_grads = rank_results[0]
        for loss, grads in rank_results[1:]:
            assert loss == ref_loss
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0)
