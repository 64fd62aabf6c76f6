"""--overlap-grad-reduce: each bucket (dense, and FP8 at O1+) is reduced by the communication
thread as soon as backward has produced its last gradient, and the results are those of the
reduction after backward to the bit - losses, gradient norms and the FP8 reduction's statistics,
at every level, with the distributed optimizer, tensor + sequence parallelism and an interleaved
pipeline; gradients are compared tensor by tensor on a model driven directly. Where the
distributed optimizer runs (its flag, or O3), the overlapped runs also take
--overlap-param-gather: the weight all-gathers run on the thread and the next forward waits."""

import json
import os

import pytest
import torch
import torch.nn as nn

from distributed import run_distributed
from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.precision import FP8Config, apply_precision
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.core.transformer.config import TransformerConfig

pytestmark = pytest.mark.distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 3
BASE = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--eval-iters", "0", "--lr-warmup-iters", "1", "--train-iters", str(ITERS), "--log-interval", "1",
        "--ddp-bucket-size", "3000"]  # many dense buckets
CASES_2 = {
    "none": [],
    "none-distopt": ["--use-distributed-optimizer"],
    "O1": ["--fp8-level", "O1"],
    "O2-distopt": ["--fp8-level", "O2", "--use-distributed-optimizer"],
    "O3": ["--fp8-level", "O3"],
}
CASES_4 = {
    "O3-tp2-sp": ["--fp8-level", "O3", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "O2-pp2-interleaved": ["--fp8-level", "O2", "--pipeline-model-parallel-size", "2", "--num-layers", "4",
                           "--num-layers-per-virtual-pipeline-stage", "1", "--use-distributed-optimizer"],
}
COMPARED = ("loss", "grad_norm", "skipped")


def trainings(rank, world_size, data_args, folder, cases):
    import pretrain_gpt

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    for name, flags in cases.items():
        for overlap in (False, True):
            metrics = os.path.join(folder, f"{name}-{'overlap' if overlap else 'after'}.jsonl")
            sharded = "--use-distributed-optimizer" in flags or "O3" in flags
            overlap_flags = ["--overlap-grad-reduce"] + (["--overlap-param-gather"] if sharded else [])
            argv = BASE + data_args + flags + ["--metrics-file", metrics] + overlap_flags * overlap
            assert pretrain_gpt.main(argv) == 0
    return True


def read(folder, name, mode):
    with open(os.path.join(folder, f"{name}-{mode}.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_identical(folder, name):
    after, overlap = read(folder, name, "after"), read(folder, name, "overlap")
    assert len(after) == len(overlap) == ITERS
    for a, o in zip(after, overlap):
        assert {k: a[k] for k in COMPARED} == {k: o[k] for k in COMPARED}, (name, a["iteration"])
        same_collectives = "--fp8-level" not in CASES_2.get(name, CASES_4.get(name)) or "O3" in name
        if "fp8" in a:  # the FP8 reduction's mu and saturated / underflowed fractions
            a_fp8, o_fp8 = dict(a["fp8"]), dict(o["fp8"])
            if not same_collectives:
                assert o_fp8.pop("weight_dp_bytes") >= a_fp8.pop("weight_dp_bytes")  # rounds padded per bucket
            assert a_fp8 == o_fp8, (name, a["iteration"])
        assert a["memory"]["grad_bytes"] == o["memory"]["grad_bytes"]
        assert a["comm"]["tp_bytes"] == o["comm"]["tp_bytes"] and a["comm"]["pp_bytes"] == o["comm"]["pp_bytes"]
        if same_collectives:
            # At O1 / O2 the FP8 all-reduce runs per bucket with overlap (its scales and counts per
            # bucket: tools/plan.py counts both ways, tests/test_plan.py checks it).
            assert a["comm"]["dp_bytes"] == o["comm"]["dp_bytes"], name
    assert after[-1]["loss"] != after[0]["loss"]  # the runs trained


@pytest.fixture(scope="module")
def two_ranks(builtin_corpus_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("overlap-2")
    run_distributed(trainings, 2, builtin_corpus_small.training_args(), str(folder), CASES_2, timeout=600)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_2))
def test_overlap_is_bit_identical_at_dp2(two_ranks, name):
    check_identical(two_ranks, name)


@pytest.mark.slow
def test_overlap_is_bit_identical_with_tp_sp_and_interleaved_pp(builtin_corpus_small, tmp_path):
    run_distributed(trainings, 4, builtin_corpus_small.training_args(), str(tmp_path), CASES_4, timeout=600)
    for name in CASES_4:
        check_identical(tmp_path, name)


# ----- the wrapper driven directly ---------------------------------------------------------------
def _model(ps, level):
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=96,
                               max_position_embeddings=16, ffn_hidden_size=128, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps, rng=model_parallel_seed(ps, 7))
    initialize_parameters(model, ps, seed=7)
    model.extra = nn.Parameter(torch.ones(3))  # never used: its bucket is handed over by finish_grad_sync
    precision = apply_precision(model, FP8Config(level=level, recipe="current", min_features=32), ps)
    return model, precision


def gradients(rank, world_size, level, overlap, microbatches):
    ps = ParallelState.build()
    model, precision = _model(ps, level)
    ddp = DistributedDataParallel(model, ps, bucket_size_mb=0.004, precision=precision, overlap_grad_reduce=overlap)
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, 96, (microbatches, 2, 17), generator=generator)
    ddp.zero_grad_buffer()
    ddp.start_grad_sync(microbatches)
    handed_over_during_backward = None
    for i in range(microbatches):
        (ddp(tokens[i, :, :-1], tokens[i, :, 1:]).mean() / microbatches).backward()
        if i == microbatches - 1 and overlap:
            handed_over_during_backward = ddp._next
    ddp.finish_grad_sync()
    dense = {n: ddp.dense_grad(p).clone() for n, p in model.named_parameters() if not precision.is_fp8_grad(p)}
    fp8 = {}
    for n, p in model.named_parameters():
        grad = ddp.fp8_grads.get(p) if precision.is_fp8_grad(p) else None
        if grad is not None:
            fp8[n] = (grad.data.view(torch.uint8).clone(), grad.scale.clone())
    late = None
    if overlap:  # a parameter whose gradient arrives once more after its bucket was handed over
        ddp.zero_grad_buffer()
        ddp.start_grad_sync(1)
        (ddp(tokens[0, :, :-1], tokens[0, :, 1:]).mean()).backward()
        try:
            (ddp(tokens[0, :, :-1], tokens[0, :, 1:]).mean()).backward()
        except RuntimeError as exc:
            late = str(exc)
        ddp._armed = False
        ddp._worker.wait()
    return dense, fp8, dict(ddp.fp8_stats), handed_over_during_backward, len(ddp._units), late


@pytest.mark.parametrize("level", ["none", "O2", "O3"])
def test_wrapper_gradients_bit_identical(level):
    after = run_distributed(gradients, 2, level, False, 2)
    overlap = run_distributed(gradients, 2, level, True, 2)
    for rank in range(2):
        dense_a, fp8_a, stats_a, _, _, _ = after[rank]
        dense_o, fp8_o, stats_o, handed, units, late = overlap[rank]
        assert dense_a.keys() == dense_o.keys()
        for name in dense_a:
            assert torch.equal(dense_a[name], dense_o[name]), (level, rank, name)
        assert fp8_a.keys() == fp8_o.keys()
        for name in fp8_a:
            assert torch.equal(fp8_a[name][0], fp8_o[name][0]) and torch.equal(fp8_a[name][1], fp8_o[name][1])
        if level == "O3":  # FP8 ZeRO: each rank keeps the gradients it owns, not all of them
            assert 0 < len(fp8_a) < sum(1 for n, _ in after[0][1].items()) + len(after[1][1])
        if level == "O2":  # per-bucket FP8 all-reduce: its scales travel per bucket
            assert stats_o.pop("dp_bytes") >= stats_a.pop("dp_bytes")  # rounds padded per bucket
        assert stats_a == stats_o
        # Buckets went during backward; the unused parameter's (the model's first) waits for the end.
        assert 0 < handed < units
        assert late is not None and "--overlap-grad-reduce" in late and "run without" in late


def test_overlap_param_gather_needs_the_distributed_optimizer(builtin_corpus_small, monkeypatch, capsys):
    import pretrain_gpt
    from megatron.training.cli import run_cli

    argv = BASE + builtin_corpus_small.training_args() + ["--overlap-param-gather", "--fp8-level", "O2"]
    assert run_cli(lambda: pretrain_gpt.main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overlap-param-gather" in err[0] and "--use-distributed-optimizer" in err[0]


def param_gather_run(rank, world_size, overlap, level):
    """Three steps with the distributed optimizer (O3: with FP8 ZeRO; O2: the FP8 weights'
    owners broadcast them) with both overlaps or neither: losses, bytes, weights left pending by a
    step (and how many of them FP8), and weights whose forward waited for them."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.factory import build_optimizer

    ps = ParallelState.build()
    model, precision = _model(ps, level)
    ddp = DistributedDataParallel(model, ps, bucket_size_mb=0.004, precision=precision, use_distributed_optimizer=True,
                                  overlap_grad_reduce=overlap, overlap_param_gather=overlap)
    fp8_ids = {id(p) for p in precision.fp8_grad_params}
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters()], OptimizerConfig(lr=1e-2), ps, ddp,
                                precision, use_distributed_optimizer=True)
    waited = []
    original = ddp._wait_for_own_params

    def counting(module, args):
        before = len(ddp._gathering)
        original(module, args)
        waited.append(before - len(ddp._gathering))
    ddp._wait_for_own_params = counting
    for sub in model.modules():  # the hooks call the bound method: re-register the counting one
        sub._forward_pre_hooks.clear()
        if any(True for _ in sub.parameters(recurse=False)):
            sub.register_forward_pre_hook(counting)
    generator = torch.Generator().manual_seed(rank)
    losses, pending = [], []
    for _ in range(3):
        tokens = torch.randint(0, 96, (2, 17), generator=generator)
        ddp.zero_grad_buffer()
        ddp.start_grad_sync(1)
        loss = ddp(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        ddp.finish_grad_sync()
        optimizer.step()
        losses.append(loss.item())
        pending.append((len(ddp._gathering), len(fp8_ids & ddp._gathering.keys())))
    ddp.wait_param_gather()
    weights = {n: p.detach().view(torch.uint8).clone() if p.element_size() == 1 else p.detach().clone()
               for n, p in model.named_parameters()}
    return losses, ps.counter.snapshot(), pending, sum(waited), weights


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_overlap_param_gather_waits_in_forward_and_is_bit_identical(level):
    after = run_distributed(param_gather_run, 2, False, level)
    overlap = run_distributed(param_gather_run, 2, True, level)
    for (losses_a, bytes_a, _, _, weights_a), (losses_o, bytes_o, pending, waited, weights_o) in zip(after, overlap):
        assert losses_a == losses_o
        # O2's FP8 all-reduce runs per bucket under overlap (scales per bucket, rounds padded per bucket).
        assert bytes_a == bytes_o if level == "O3" else bytes_o["dp_bytes"] >= bytes_a["dp_bytes"]
        for name in weights_a:
            assert torch.equal(weights_a[name], weights_o[name]), name
        # Every step leaves its gathers to the thread, and the next step's forward waits for them
        # (`extra` too: it is the model's own parameter, so the model's forward waits for it).
        assert all(0 < p <= len(weights_a) and fp8 == 8 for p, fp8 in pending)  # every FP8 weight, too
        assert waited == pending[0][0] + pending[1][0]
