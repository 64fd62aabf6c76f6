"""Pipeline parallelism against a single process: the same losses, gradient norms and step-0
gradients by global name (FP32, tight tolerance) over several optimizer steps, for 1F1B and the
interleaved schedule, tied and untied embeddings; the bytes the schedule sends; and TP 2 x PP 2 x
DP 2 on 8 processes training to the reference's losses."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.optimizer import MixedPrecisionOptimizer, OptimizerConfig
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name, initialize_parameters, parallelize_gpt
from megatron.core.pipeline_parallel.model import allreduce_embedding_grads, build_gpt_stages
from megatron.core.pipeline_parallel.p2p_communication import activation_shape
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func, reported_mean
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.core.transformer.config import TransformerConfig
from distributed import run_distributed

pytestmark = pytest.mark.distributed

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=2,
                  untie_embeddings_and_output_weights=True),
}
GLOBAL_BATCH, SEQ, HIDDEN, STEPS = 8, 16, 32, 3


def make_config(variant: str, num_layers: int) -> TransformerConfig:
    return TransformerConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4, vocab_size=64,
                             max_position_embeddings=SEQ, ffn_hidden_size=64, hidden_dropout=0.0,
                             attention_dropout=0.0, **VARIANTS[variant])


def global_batches(steps: int = STEPS, repeat: bool = False):
    g = torch.Generator().manual_seed(99)
    batches = [torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]
    return [batches[0]] * steps if repeat else batches


def forward_step(data_iterator, model):
    micro = next(data_iterator)
    output = model(micro[:, :-1], micro[:, 1:])
    return output, lambda per_token: (per_token.mean(), {"loss": per_token.mean().detach()})


def build(ps: ParallelState, config: TransformerConfig, sequence_parallel: bool, layers_per_virtual_stage):
    rng = model_parallel_seed(ps, 1234)
    chunks = build_gpt_stages(config, ps, num_layers_per_virtual_stage=layers_per_virtual_stage)
    for chunk in chunks:
        parallelize_gpt(chunk, ps, sequence_parallel=sequence_parallel, rng=rng)
        initialize_parameters(chunk, ps, seed=1234)
    return chunks


def train(ps: ParallelState, variant: str, num_layers: int, micro_batch: int, *, layers_per_virtual_stage=None,
          sequence_parallel: bool = False, steps: int = STEPS, repeat: bool = False):
    """`steps` optimizer steps; returns (loss, grad norm) per step, this rank's step-0 gradients by
    global name, the pp bytes the schedule sent in step 0, and a forward-only loss at the end."""
    config = make_config(variant, num_layers)
    chunks = build(ps, config, sequence_parallel and ps.tp_size > 1, layers_per_virtual_stage)
    ddp = DistributedDataParallel(chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks), ps, bucket_size_mb=0.01)
    model = ddp if len(chunks) == 1 else chunks
    adam_config = OptimizerConfig(lr=1e-2, clip_grad=0.5)
    optimizer = MixedPrecisionOptimizer(list(ddp.module.named_parameters()), adam_config, ps, grad_of=ddp.dense_grad,
                                        layouts=ddp.layouts)
    shape = activation_shape(SEQ, micro_batch, HIDDEN, tp_size=ps.tp_size, sequence_parallel=sequence_parallel)
    schedule = get_forward_backward_func(ps, len(chunks), tensor_shape=shape)
    per_rank = GLOBAL_BATCH // ps.dp_size

    def run(batch, forward_only=False):
        micros = list(batch[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank].split(micro_batch))
        return schedule(forward_step=forward_step, data_iterator=iter(micros), model=model,
                        num_microbatches=len(micros), forward_only=forward_only)

    losses, grads, pp_bytes = [], {}, 0
    for step, batch in enumerate(global_batches(steps, repeat)):
        ddp.zero_grad_buffer()
        before = ps.counter.snapshot()
        reported = run(batch)
        if step == 0:
            pp_bytes = ps.counter.since(before)["pp_bytes"]
        loss = reported_mean(reported, "loss", ps)
        ddp.finish_grad_sync()
        allreduce_embedding_grads(chunks, ps, ddp.dense_grad)
        if step == 0:
            grads = {global_name(chunk, n): (ddp.dense_grad(p).clone(), ddp.layouts[p].tp_dim, ddp.layouts[p].tp_parts)
                     for chunk in chunks for n, p in chunk.named_parameters()}
        losses.append((loss, optimizer.step().grad_norm))
    with torch.no_grad():
        eval_loss = reported_mean(run(global_batches()[0], forward_only=True), "loss", ps)
    return losses, grads, pp_bytes, eval_loss


# (name, pp, variant, layers, micro_batch, layers per virtual stage); 4 processes, so pp 2 runs dp 2.
PIPELINE_CASES = [
    ("1f1b-pp4-tied", 4, "gpt2", 4, 1, None),
    ("1f1b-pp4-untied", 4, "llama", 4, 1, None),
    ("1f1b-pp2-dp2-tied", 2, "gpt2", 2, 1, None),
    ("interleaved-pp2-dp2-untied", 2, "llama", 4, 1, 1),
    ("interleaved-pp4-tied", 4, "gpt2", 8, 1, 1),
    ("interleaved-pp4-all-warmup", 4, "gpt2", 8, 2, 1),  # micro-batches == pp: no steady state
]
# TP 2 x PP 2 x DP 2 with sequence parallelism, on one batch repeated so the loss must fall.
HYBRID = dict(variant="gpt2", num_layers=2, micro_batch=1, sequence_parallel=True, steps=5, repeat=True)


def pipeline_worker(rank, world_size):
    results = []
    for _, pp, variant, layers, micro, per_virtual in PIPELINE_CASES:
        ps = ParallelState.build(1, pp)
        result = train(ps, variant, layers, micro, layers_per_virtual_stage=per_virtual)
        results.append((ps.pp_rank, ps.dp_size, result))
        dist.barrier()
    return results


def hybrid_worker(rank, world_size):
    ps = ParallelState.build(2, 2)
    return ps.tp_rank, train(ps, **HYBRID)


@pytest.fixture(scope="module")
def pipeline_results():
    return run_distributed(pipeline_worker, 4, timeout=300)


def reference(variant, num_layers, **kw):
    return train(ParallelState.single(), variant, num_layers, GLOBAL_BATCH, **kw)


@pytest.mark.parametrize("case_index", range(len(PIPELINE_CASES)), ids=[c[0] for c in PIPELINE_CASES])
def test_pipeline_matches_single_process(pipeline_results, case_index):
    _, pp, variant, layers, micro, per_virtual = PIPELINE_CASES[case_index]
    ref_losses, ref_grads, _, ref_eval = reference(variant, layers)
    per_rank = [pipeline_results[rank][case_index] for rank in range(4)]
    losses = per_rank[0][2][0]
    for _, _, (rank_losses, _, _, eval_loss) in per_rank:
        assert rank_losses == losses  # every stage logs the last stage's loss and the global norm
        assert eval_loss == pytest.approx(ref_eval, rel=1e-5)
    for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-4)
    seen = set()
    for _, _, (_, grads, _, _) in per_rank:
        for name, (grad, _, _) in grads.items():
            # Both copies of a tied embedding hold the summed gradient.
            torch.testing.assert_close(grad, ref_grads[name][0], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(ref_grads)


@pytest.mark.parametrize("case_index", range(len(PIPELINE_CASES)), ids=[c[0] for c in PIPELINE_CASES])
def test_pipeline_sends_one_activation_and_one_gradient_per_microbatch_and_stage(pipeline_results, case_index):
    _, pp, _, layers, micro, per_virtual = PIPELINE_CASES[case_index]
    chunks = layers // pp // per_virtual if per_virtual else 1
    message = SEQ * micro * HIDDEN * 4  # float32 activation
    for pp_rank, dp_size, (_, _, pp_bytes, _) in (pipeline_results[rank][case_index] for rank in range(4)):
        microbatches = GLOBAL_BATCH // dp_size // micro
        forward_sends = microbatches * chunks - (microbatches if pp_rank == pp - 1 else 0)
        backward_sends = microbatches * chunks - (microbatches if pp_rank == 0 else 0)
        assert pp_bytes == (forward_sends + backward_sends) * message


@pytest.mark.slow
def test_tp2_pp2_dp2_trains_like_one_process():
    results = run_distributed(hybrid_worker, 8, timeout=300)
    ref_losses, _, _, _ = reference(HYBRID["variant"], HYBRID["num_layers"], steps=HYBRID["steps"], repeat=True)
    losses = results[0][1][0]
    assert all(result[0] == losses for _, result in results)  # every rank logs the same loss and norm
    assert losses[-1][0] < losses[0][0] - 0.1
    for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert norm == pytest.approx(ref_norm, rel=1e-3)


def deallocation_worker(rank, world_size):
    """1F1B on 2 stages, 4 micro-batches; the first stage's outputs, kept by the test. Returns
    (stage, bytes each output still holds after the step, full bytes)."""
    ps = ParallelState.build(1, 2)
    chunks = build(ps, make_config("gpt2", 2), False, None)
    ddp = DistributedDataParallel(chunks[0], ps)
    schedule = get_forward_backward_func(ps, 1, tensor_shape=activation_shape(SEQ, 2, HIDDEN))
    outputs = []

    def recording_step(data_iterator, model):
        output, loss_fn = forward_step(data_iterator, model)
        outputs.append(output)
        return output, loss_fn

    ddp.zero_grad_buffer()
    schedule(forward_step=recording_step, data_iterator=iter(global_batches()[0].split(2)), model=ddp,
             num_microbatches=4)
    full = SEQ * 2 * HIDDEN * 4
    return ps.pp_rank, [o.untyped_storage().nbytes() for o in outputs], full


def test_sent_activations_are_freed_once_sent():
    """Megatron's deallocate_output_tensor: a stage keeps a sent output's graph for its backward,
    not its values."""
    results = run_distributed(deallocation_worker, 2)
    first = next(r for r in results if r[0] == 0)
    assert len(first[1]) == 4 and all(nbytes == 4 for nbytes in first[1]), first[1]  # one FP32 element each
    assert first[2] == 4096
    # That gradients are unchanged by it: the pipeline cases above, against one process.
