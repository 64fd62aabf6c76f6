"""The distributed optimizer (ZeRO-1) against MixedPrecisionOptimizer with the all-reduce DDP:
same parameters and grad norms over several steps (FP32 and BF16, DP 2 and 4, TP 2 x DP 2), skipped
steps change nothing anywhere, 1/dp memory, ring-model byte counts, and per-parameter state saved
at DP 2 resumed at DP 4. All distributed checks share one start of 4 gloo processes."""

import io
import math

import pytest
import torch
import torch.distributed as dist

from megatron.core.distributed import comm
from megatron.core.distributed.data_parallel import SHARD_ALIGN_NUMEL, DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MixedPrecisionOptimizer, OptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.layout import ParamLayout, ParamLayouts
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.transformer.config import TransformerConfig
from distributed import run_distributed

GLOBAL_BATCH, SEQ, STEPS, RESUME_AT = 8, 8, 4, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Clipping at 0.05 is active on every step of this model; 100 never is.
CLIP = {"fp32": 0.05, "bf16": 100.0}
# The key bias gets no gradient in exact arithmetic (softmax ignores a per-query constant), only
# rounding noise, which Adam scales up to steps of about lr: a last-bit change anywhere upstream (a
# norm summed in another order moves the clip factor) moves those elements by up to ~1e-4 * lr.
FP32_TOLERANCE = dict(rtol=1e-6, atol=2e-6)


# ----- one training run --------------------------------------------------------------------------
def build(ps: ParallelState, dtype_name: str, distributed: bool, seed: int = 1234, sequence_parallel=False):
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                               max_position_embeddings=SEQ, ffn_hidden_size=64, hidden_dropout=0.0,
                               attention_dropout=0.0, params_dtype=DTYPES[dtype_name])
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps, sequence_parallel=sequence_parallel)
    initialize_parameters(model, ps, seed=seed)
    # Small buckets: several of them, so per-bucket sharding and padding are exercised.
    ddp = DistributedDataParallel(model, ps, bucket_size_mb=0.02, use_distributed_optimizer=distributed)
    named = list(model.named_parameters())
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=CLIP[dtype_name])
    optimizer = (DistributedOptimizer(named, config, ps, ddp) if distributed
                 else MixedPrecisionOptimizer(named, config, ps, grad_of=ddp.dense_grad, layouts=ddp.layouts))
    return model, ddp, optimizer


def global_batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(ps, ddp, optimizer, steps: range, inject_inf: bool = False) -> list[tuple[bool, float]]:
    """Optimizer steps `steps` of the fixed global batches under a changing lr (as a scheduler sets it)."""
    results, per_rank = [], GLOBAL_BATCH // ps.dp_size
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (step + 1) / STEPS
        mine = global_batches()[step][ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank]
        ddp.zero_grad_buffer()
        ddp(mine[:, :-1], mine[:, 1:]).float().mean().backward()
        if inject_inf and ps.dp_rank == 1:
            ddp.dense_grad(next(ddp.module.parameters())).view(-1)[3] = math.inf
        ddp.finish_grad_sync()
        result = optimizer.step()
        results.append((result.skipped, result.grad_norm))
    return results


def params_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def by_name(model, states: dict) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: entry for p, entry in states.items()}


# ----- layouts inside the world of 4 ---------------------------------------------------------------
def pair_state(rank: int) -> ParallelState:
    """DP = 2 inside the world of 4: ranks {0, 1} and {2, 3} each form a data-parallel pair."""
    singles = [dist.new_group([r]) for r in range(4) for _ in ("tp", "pp")]
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = (rank // 2 * 2, rank // 2 * 2 + 1)
    return ParallelState(world_size=2, rank=rank % 2, tp_size=1, pp_size=1, dp_size=2, tp_rank=0, pp_rank=0,
                         dp_rank=rank % 2, device=torch.device("cpu"), backend="gloo",
                         tp_group=singles[2 * rank], pp_group=singles[2 * rank + 1], dp_group=pairs[rank // 2],
                         tp_ranks=(rank,), dp_ranks=mine, pp_ranks=(rank,))


# ----- checks run in each worker ------------------------------------------------------------------
def compare_with_plain(ps, dtype_name, sequence_parallel=False) -> dict:
    """Plain and distributed runs from one seed; what the test compares, plus the final state."""
    out = {}
    for kind in ("plain", "distributed"):
        model, ddp, optimizer = build(ps, dtype_name, kind == "distributed", sequence_parallel=sequence_parallel)
        out[kind] = {"results": train(ps, ddp, optimizer, range(STEPS)), "params": params_of(model),
                     "master_plus_optim": optimizer.master_bytes() + optimizer.optim_bytes(),
                     "local_state": by_name(model, optimizer.local_state())}
    return out


def skipped_step_changes_nothing(ps) -> dict:
    model, ddp, optimizer = build(ps, "bf16", True)
    train(ps, ddp, optimizer, range(1))
    before = (params_of(model), by_name(model, optimizer.local_state()), optimizer.step_count())
    results = train(ps, ddp, optimizer, range(1, 2), inject_inf=True)
    after = (params_of(model), by_name(model, optimizer.local_state()), optimizer.step_count())
    return {"results": results, "before": before, "after": after}


def counted_bytes(ps) -> dict:
    model, ddp, optimizer = build(ps, "bf16", True)
    counter = ps.counter
    start = counter.snapshot()
    train(ps, ddp, optimizer, range(1))
    return {"counted": counter.since(start), "bucket_numels": [b.buffer.numel() for b in ddp.grad_buffer.buckets]}


def save_and_resume(save_ps, load_ps, dtype_name) -> dict:
    """Train RESUME_AT steps under `save_ps`, assemble whole per-parameter state from every
    data-parallel rank's `local_state` (as a checkpoint does), load it under `load_ps`, continue."""
    model, ddp, optimizer = build(save_ps, dtype_name, True)
    fresh_keys = sorted({k for entry in optimizer.local_state().values() for k in entry})
    train(save_ps, ddp, optimizer, range(RESUME_AT))
    shards = [None] * save_ps.dp_size
    dist.all_gather_object(shards, (by_name(model, optimizer.local_state()), optimizer.step_count()),
                           group=save_ps.dp_group)
    full = assemble(shards, {n: p.shape for n, p in model.named_parameters()})
    # A different seed, so nothing but the loaded state can make the runs agree.
    model, ddp, optimizer = build(load_ps, dtype_name, True, seed=99)
    optimizer.load_local_state({p: full[n] for n, p in model.named_parameters()}, shards[0][1])
    loaded = {"params": params_of(model), "state": by_name(model, optimizer.local_state()),
              "step_count": optimizer.step_count()}
    train(load_ps, ddp, optimizer, range(RESUME_AT, STEPS))
    return {"fresh_state_keys": fresh_keys, "full": full, "loaded": loaded, "params": params_of(model)}


def assemble(shards, shapes: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Whole local tensors from every data-parallel rank's owned ranges (what a checkpoint reshards)."""
    full = {name: {key: torch.full((math.prod(shape),), math.nan) for key in ("master", "exp_avg", "exp_avg_sq")}
            for name, shape in shapes.items()}
    for states, _ in shards:
        for name, entry in states.items():
            start, end = entry["range"]
            for key in full[name]:
                full[name][key][start:end] = entry[key]
    return {name: {key: t.view(shapes[name]) for key, t in entry.items()} for name, entry in full.items()}


def worker(rank, world_size):
    world_ps = ParallelState.build(1, 1)
    pair_ps = pair_state(rank)
    out = {"dp4": {d: compare_with_plain(world_ps, d) for d in DTYPES},
           "dp2": {d: compare_with_plain(pair_ps, d) for d in DTYPES},
           "skip": skipped_step_changes_nothing(world_ps), "bytes": counted_bytes(world_ps),
           "dp2_to_dp4": {d: save_and_resume(pair_ps, world_ps, d) for d in DTYPES},
           "dp4_to_dp4": {d: save_and_resume(world_ps, world_ps, d) for d in DTYPES}}
    out["tp2dp2"] = compare_with_plain(ParallelState.build(2, 1), "fp32", sequence_parallel=True)
    if gloo_has_fused_collectives():
        # The CUDA (NCCL) code path of reduce-scatter and all-gather, on CPU.
        comm._use_fused = lambda t: True
        out["fused"] = compare_with_plain(world_ps, "bf16")
    return out


def gloo_has_fused_collectives() -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 13)  # gloo's all_gather_single / reduce_scatter_single


# ----- the tests ----------------------------------------------------------------------------------
pytestmark = pytest.mark.distributed
LAYOUTS = [("dp4", 4, "fp32"), ("dp4", 4, "bf16"), ("dp2", 2, "fp32"), ("dp2", 2, "bf16"), ("tp2dp2", 2, "fp32"),
           ("fused", 4, "bf16")]


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, 4, timeout=300)


def layout_run(results, rank, layout, dtype_name):
    if layout == "fused" and "fused" not in results[rank]:
        pytest.skip("this torch's gloo lacks the fused collectives the CUDA path uses")
    run = results[rank][layout]
    return run if layout in ("tp2dp2", "fused") else run[dtype_name]


@pytest.mark.parametrize("layout,dp,dtype_name", LAYOUTS)
def test_same_updates_and_norms_as_plain_optimizer(results, layout, dp, dtype_name):
    for rank in range(4):
        run = layout_run(results, rank, layout, dtype_name)
        plain, distributed = run["plain"], run["distributed"]
        for (p_skip, p_norm), (d_skip, d_norm) in zip(plain["results"], distributed["results"]):
            assert not p_skip and not d_skip
            assert d_norm == pytest.approx(p_norm, rel=1e-6)
            if dtype_name == "fp32":
                assert p_norm > CLIP["fp32"]  # the clipping path is the one compared
        for name, expected in plain["params"].items():
            # BF16 rounding of masters that differ in the last FP32 bit may flip one BF16 ulp.
            tolerance = FP32_TOLERANCE if dtype_name == "fp32" else dict(rtol=8e-3, atol=1e-6)
            torch.testing.assert_close(distributed["params"][name], expected, **tolerance,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


@pytest.mark.parametrize("layout,dp,dtype_name", LAYOUTS)
def test_owned_masters_and_moments_match_plain(results, layout, dp, dtype_name):
    for rank in range(4):
        run = layout_run(results, rank, layout, dtype_name)
        plain, distributed = run["plain"]["local_state"], run["distributed"]["local_state"]
        for name, entry in distributed.items():
            start, end = entry["range"]
            for key, atol in (("master", FP32_TOLERANCE["atol"]), ("exp_avg", 1e-9), ("exp_avg_sq", 1e-15)):
                torch.testing.assert_close(entry[key], plain[name][key][start:end], rtol=1e-5, atol=atol,
                                           msg=lambda m: f"rank {rank} {name} {key}: {m}")


@pytest.mark.parametrize("layout,dp,dtype_name", LAYOUTS)
def test_ranges_partition_every_parameter(results, layout, dp, dtype_name):
    """Across one data-parallel group, the owned ranges cover each parameter exactly once."""
    group = {"dp2": [0, 1], "tp2dp2": [0, 2]}.get(layout, [0, 1, 2, 3])
    states = [layout_run(results, r, layout, dtype_name)["distributed"]["local_state"] for r in group]
    sizes = {n: t.numel() for n, t in layout_run(results, 0, layout, dtype_name)["plain"]["params"].items()}
    for name, numel in sizes.items():
        ranges = sorted(s[name]["range"] for s in states if name in s)
        assert ranges[0][0] == 0 and ranges[-1][1] == numel, (name, ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (name, ranges)


@pytest.mark.parametrize("layout,dp,dtype_name", LAYOUTS)
def test_master_and_optimizer_memory_fall_as_one_over_dp(results, layout, dp, dtype_name):
    for rank in range(4):
        run = layout_run(results, rank, layout, dtype_name)
        plain, distributed = run["plain"]["master_plus_optim"], run["distributed"]["master_plus_optim"]
        padding = 12 * SHARD_ALIGN_NUMEL * 8  # under one aligned chunk per bucket (< 8 here), 12 bytes/element
        assert plain / dp * 0.9 <= distributed <= plain / dp + padding, (rank, plain, distributed)


def test_skipped_step_changes_nothing_on_any_rank(results):
    for rank in range(4):
        skip = results[rank]["skip"]
        assert skip["results"] == [(True, math.inf)]
        (params_before, state_before, steps_before), (params_after, state_after, steps_after) = \
            skip["before"], skip["after"]
        assert steps_before == steps_after == 1
        for name in params_before:
            assert torch.equal(params_before[name], params_after[name]), name
        for name, entry in state_before.items():
            for key in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(entry[key], state_after[name][key]), (name, key)


def test_dp_bytes_are_reduce_scatter_plus_param_all_gather(results):
    n = 4
    for rank in range(4):
        counted = results[rank]["bytes"]
        numels = counted["bucket_numels"]
        reduce_scatter = sum((n - 1) * 4 * numel // n for numel in numels)    # FP32 grads
        all_gather = sum((n - 1) * 2 * numel // n for numel in numels)        # BF16 params
        norm = 2 * (n - 1) * 8 // n                                            # one float64 scalar
        assert counted["counted"] == {"dp_bytes": reduce_scatter + all_gather + norm, "tp_bytes": 0, "pp_bytes": 0}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_state_saved_at_dp2_loads_exactly_at_dp4(results, dtype_name):
    for rank in range(4):
        resumed = results[rank]["dp2_to_dp4"][dtype_name]
        assert resumed["fresh_state_keys"] == ["master", "range"]  # no moments before the first update
        full, loaded = resumed["full"], resumed["loaded"]
        assert loaded["step_count"] == RESUME_AT
        for name, whole in full.items():
            assert not any(t.isnan().any() for t in whole.values()), f"{name}: ranges at DP 2 left a hole"
            assert torch.equal(loaded["params"][name], whole["master"].to(loaded["params"][name].dtype)), name
        for name, entry in loaded["state"].items():
            start, end = entry["range"]
            for key in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(entry[key], full[name][key].view(-1)[start:end]), (rank, name, key)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_resume_through_local_state_is_exact(results, dtype_name):
    for rank in range(4):
        resumed = results[rank]["dp4_to_dp4"][dtype_name]["params"]
        for name, expected in results[rank]["dp4"][dtype_name]["distributed"]["params"].items():
            assert torch.equal(resumed[name], expected), name


def test_state_saved_at_dp2_continues_like_an_uninterrupted_dp4_run(results):
    """FP32 only: BF16 GEMMs round differently for 4 and 2 samples per rank, so a BF16 model's
    trajectory depends on the layout itself, resumed or not."""
    for rank in range(4):
        resumed = results[rank]["dp2_to_dp4"]["fp32"]["params"]
        for name, expected in results[rank]["dp4"]["fp32"]["distributed"]["params"].items():
            torch.testing.assert_close(resumed[name], expected, **FP32_TOLERANCE, msg=lambda m: f"{name}: {m}")


# ----- single process ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_single_process_is_the_plain_optimizer_bit_for_bit(dtype_name):
    run = compare_with_plain(ParallelState.single(), dtype_name)
    plain, distributed = run["plain"], run["distributed"]
    assert distributed["results"] == plain["results"]
    for name, expected in plain["params"].items():
        assert torch.equal(distributed["params"][name], expected), name
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(distributed["local_state"][name][key], plain["local_state"][name][key]), (name, key)


def test_state_dict_resumes_the_same_layout_and_refuses_another():
    ps = ParallelState.single()
    model, ddp, optimizer = build(ps, "bf16", True)
    train(ps, ddp, optimizer, range(RESUME_AT))
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed_model, resumed_ddp, resumed = build(ps, "bf16", True, seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.step_count() == RESUME_AT
    train(ps, ddp, optimizer, range(RESUME_AT, STEPS))
    train(ps, resumed_ddp, resumed, range(RESUME_AT, STEPS))
    for name, expected in params_of(model).items():
        assert torch.equal(params_of(resumed_model)[name], expected), name
    other_layout = dict(checkpoint["optimizer"], layout={**checkpoint["optimizer"]["layout"], "dp_size": 2})
    with pytest.raises(ValueError, match="load_local_state"):
        resumed.load_state_dict(other_layout)


def test_needs_a_distributed_optimizer_ddp_over_the_same_parameters():
    ps = ParallelState.single()
    model, plain_ddp, _ = build(ps, "fp32", False)
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="use_distributed_optimizer=True"):
        DistributedOptimizer(named, OptimizerConfig(lr=1e-3), ps, plain_ddp)
    ddp = DistributedDataParallel(model, ps, use_distributed_optimizer=True)
    with pytest.raises(ValueError, match="trainable parameters"):
        DistributedOptimizer(named[1:], OptimizerConfig(lr=1e-3), ps, ddp)


def test_sharded_buckets_are_padded_and_split_by_dtype_and_shared_embedding():
    module = torch.nn.Module()
    module.a = torch.nn.Parameter(torch.zeros(10))
    module.b = torch.nn.Parameter(torch.zeros(3, 5))
    module.c = torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16))
    module.d = torch.nn.Parameter(torch.zeros(4))
    module.e = torch.nn.Parameter(torch.zeros(6))
    layouts = ParamLayouts([(module.d, ParamLayout(tied_embedding=True))])
    plain = DistributedDataParallel(module, ParallelState.single(), layouts=layouts)
    assert [len(b.params) for b in plain.grad_buffer.buckets] == [5]
    assert plain.grad_buffer.data.numel() == 42
    sharded = DistributedDataParallel(module, ParallelState.single(), use_distributed_optimizer=True, layouts=layouts)
    buckets = sharded.grad_buffer.buckets
    # Reverse definition order, as backward produces them: [e], [d] alone, [c] (bf16), [b, a].
    assert [[id(p) for p in b.params] for b in buckets] == \
        [[id(module.e)], [id(module.d)], [id(module.c)], [id(module.b), id(module.a)]]
    assert all(b.buffer.numel() == SHARD_ALIGN_NUMEL for b in buckets)
    for param, (start, end) in sharded.grad_buffer.param_ranges.items():
        assert sharded.dense_grad(param).data_ptr() == sharded.grad_buffer.data[start:end].data_ptr()
        assert not vars(param)  # handed over by the wrapper, nothing left on the parameter
