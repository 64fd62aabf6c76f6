"""Tensor, sequence and data parallelism against a single process: the same losses and
gradients (FP32, tight tolerance) over several optimizer steps from one seed."""

import pytest
import torch
import torch.distributed as dist

from fp8 import sqnr_db
from megatron.core.distributed import comm
from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MixedPrecisionOptimizer, OptimizerConfig
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name, initialize_parameters, parallelize_gpt
from megatron.core.precision import FP8Config, apply_precision
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.core.transformer.config import TransformerConfig
from distributed import run_distributed

pytestmark = pytest.mark.distributed

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=2,
                  untie_embeddings_and_output_weights=True),
}
GLOBAL_BATCH, SEQ, STEPS = 8, 16, 3


def make_config(variant: str) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
                             max_position_embeddings=SEQ, ffn_hidden_size=128, hidden_dropout=0.0,
                             attention_dropout=0.0, **VARIANTS[variant])


def global_batches():
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, 128, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(ps: ParallelState, variant: str, sequence_parallel: bool, micro_batch: int, fp8_level: str = "none"):
    """STEPS optimizer steps on fixed global batches; returns losses and this rank's first-step
    gradients by global parameter name, with what is needed to reassemble shards."""
    rng = model_parallel_seed(ps, 1234)
    model = GPTModel(make_config(variant), device="meta")
    parallelize_gpt(model, ps, sequence_parallel=sequence_parallel, rng=rng)
    initialize_parameters(model, ps, seed=1234)
    precision = apply_precision(model, FP8Config(level=fp8_level, recipe="current", min_features=32), ps)
    ddp = DistributedDataParallel(model, ps, bucket_size_mb=0.01, precision=precision)  # several buckets
    optimizer = MixedPrecisionOptimizer(list(model.named_parameters()), OptimizerConfig(lr=1e-2, clip_grad=0.5), ps,
                                        grad_of=ddp.dense_grad, layouts=ddp.layouts)
    per_rank = GLOBAL_BATCH // ps.dp_size
    losses, grads = [], {}
    for step, batch in enumerate(global_batches()):
        ddp.zero_grad_buffer()
        mine = batch[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank]
        total = torch.zeros(())
        micro_batches = mine.split(micro_batch)
        for micro in micro_batches:
            loss = ddp(micro[:, :-1], micro[:, 1:]).mean()
            (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        ddp.finish_grad_sync()
        if ps.dp_size > 1:
            comm.all_reduce(total, ps, "dp").div_(ps.dp_size)
        if step == 0:
            grads = {global_name(model, n): (ddp.dense_grad(p).clone(), ddp.layouts[p].tp_dim, ddp.layouts[p].tp_parts)
                     for n, p in model.named_parameters()}
        result = optimizer.step()
        losses.append((total.item(), result.grad_norm))
    return losses, grads


def unshard(per_rank: list, dim, parts: int) -> torch.Tensor:
    if dim is None:
        return per_rank[0]
    pieces = [t.chunk(parts, dim=dim) for t in per_rank]
    return torch.cat([torch.cat([p[i] for p in pieces], dim=dim) for i in range(parts)], dim=dim)


def worker(rank, world_size, cases):
    results = []
    for tp, variant, sp, micro, level in cases:
        ps = ParallelState.build(tp, 1)
        results.append(train(ps, variant, sp, micro, level))
        dist.barrier()
    return results


CASES = [  # (tp, variant, sequence_parallel, micro_batch, fp8 level)
    (2, "gpt2", False, 4, "none"),
    (2, "gpt2", True, 2, "none"),
    (2, "llama", True, 4, "none"),
    (1, "gpt2", False, 2, "none"),   # world 2 with tp 1: data parallel 2
    (1, "llama", False, 4, "none"),
    (2, "gpt2", True, 4, "O0"),
]


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(worker, 2, CASES, timeout=300)


@pytest.mark.parametrize("case_index", range(len(CASES)))
def test_parallel_layout_matches_single_process(distributed_results, case_index):
    tp, variant, sp, micro, level = CASES[case_index]
    reference_losses, reference_grads = train(ParallelState.single(), variant, False, GLOBAL_BATCH, level)
    per_rank = [distributed_results[rank][case_index] for rank in range(2)]
    losses = per_rank[0][0]
    assert per_rank[1][0] == losses  # every rank reports the same loss and norm
    exact = level == "none"
    for (loss, norm), (ref_loss, ref_norm) in zip(losses, reference_losses):
        assert loss == pytest.approx(ref_loss, rel=1e-5 if exact else 2e-3)
        assert norm == pytest.approx(ref_norm, rel=1e-4 if exact else 5e-2)
    # Step 0 gradients: shards reassembled (TP) or equal on every rank (DP) match the reference.
    for name, (ref, _, _) in reference_grads.items():
        _, dim, parts = per_rank[0][1][name]
        shards = [per_rank[rank][1][name][0] for rank in range(2)]
        if tp == 1:  # data parallel: every rank holds the whole, identical, averaged gradient
            torch.testing.assert_close(shards[1], shards[0], rtol=0, atol=0)
            full = shards[0]
        else:
            full = unshard(shards, dim, parts)
        if exact:
            torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:  # FP8 rounds each shard with its own scales: compare as signal to noise
            assert sqnr_db(ref, full) > 15, name
