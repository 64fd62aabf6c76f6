"""Levels O1 and O2 (and O3's accuracy) end to end: bytes per parameter, FP8 gradient traffic, skipped non-finite
steps, exact resume with the auto-scaler, and training to the loss of level none."""

import json
import math
import os

import pytest
import torch

import pretrain_gpt
from fp8.optim import is_scaled_fp16
from distributed import run_distributed
from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.factory import build_optimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.precision import FP8Config, apply_precision
from megatron.core.transformer.config import TransformerConfig
from megatron.training.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--eval-iters", "0", "--lr-warmup-iters", "5"]



def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(argv):
    return run_cli(lambda: pretrain_gpt.main(argv))


def tiny_model(level: str, dtype=torch.float32):
    config = TransformerConfig(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=256,
                               max_position_embeddings=32, ffn_hidden_size=512, hidden_dropout=0.0,
                               attention_dropout=0.0, params_dtype=dtype)
    ps = ParallelState.single()
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=3)
    fp8 = FP8Config(level=level, recipe="current", min_features=64)
    return model, ps, fp8, apply_precision(model, fp8, ps)


@pytest.mark.parametrize("dtype,per_other", [(torch.float32, 16), (torch.bfloat16, 18)])
@pytest.mark.parametrize("level,per_fp8_weight", [("O1", 11), ("O2", 6)])
def test_state_bytes_per_param_follow_the_precision_table(level, per_fp8_weight, dtype, per_other):
    """FP8 linear weights: 2 (FP16 master) + 1 (FP8 grad) + 8 (FP32 Adam, O1) or 1 + 2 (O2), plus
    scales; every other parameter 16 (FP32 model) or 2 + 4 + 4 + 8 = 18 (BF16 with FP32 masters)."""
    model, ps, fp8, precision = tiny_model(level, dtype)
    ddp = DistributedDataParallel(model, ps, precision=precision)
    optimizer = build_optimizer(list(model.named_parameters()), OptimizerConfig(lr=1e-3), ps, ddp, precision,
                                use_distributed_optimizer=False)
    tokens = torch.randint(0, 256, (2, 33))
    model(tokens[:, :-1], tokens[:, 1:]).float().mean().backward()
    ddp.finish_grad_sync()
    assert not optimizer.step().skipped
    fp8_weights = ddp.fp8_grad_params
    assert len(fp8_weights) == 8 and all(is_scaled_fp16(p) for p in fp8_weights)
    others = [p for p in model.parameters() if not precision.is_fp8_grad(p)]
    fp8_numel, other_numel = sum(p.numel() for p in fp8_weights), sum(p.numel() for p in others)
    weight = sum(p.numel() * p.element_size() + (4 if is_scaled_fp16(p) else 0) for p in model.parameters())
    held = weight + ddp.grad_buffer.nbytes + ddp.fp8_grad_bytes + optimizer.master_bytes() + optimizer.optim_bytes()
    scales = len(fp8_weights) * 4 * (4 if level == "O2" else 2)  # weight + grad (+ m + v) scales
    assert held == per_fp8_weight * fp8_numel + per_other * other_numel + scales


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_non_finite_fp8_gradient_skips_the_step_and_keeps_everything(level):
    model, ps, fp8, precision = tiny_model(level)
    ddp = DistributedDataParallel(model, ps, precision=precision)
    optimizer = build_optimizer(list(model.named_parameters()), OptimizerConfig(lr=1e-3), ps, ddp, precision,
                                use_distributed_optimizer=False)
    tokens = torch.randint(0, 256, (2, 33))

    def step(poison: bool):
        ddp.zero_grad_buffer()
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        if poison:
            ddp.fp8_grads.get(ddp.fp8_grad_params[3]).data[0, 0] = float("nan")
        ddp.finish_grad_sync()
        return optimizer.step()

    assert not step(False).skipped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    states_before = {p: {k: v.clone() for k, v in optimizer.parts[1].fp8.state_fp32(p).items()} for p in ddp.fp8_grad_params}
    result = step(True)
    assert result.skipped and not math.isfinite(result.grad_norm)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    for param, states in states_before.items():
        for key, value in optimizer.parts[1].fp8.state_fp32(param).items():
            assert torch.equal(value, states[key])
    assert not step(False).skipped  # and training goes on


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_resume_is_exact_with_fp8_gradients(level, builtin_corpus_small, tmp_path):
    args = FAST + builtin_corpus_small.training_args() + ["--train-iters", "6", "--log-interval", "1",
                                                     "--fp8-level", level, "--fp8-wgrad-auto-scaling-window", "2"]
    assert run(args + ["--metrics-file", str(tmp_path / "full.jsonl")]) == 0
    split = str(tmp_path / "split.jsonl")
    assert run(args + ["--metrics-file", split, "--save", str(tmp_path / "ck"), "--exit-interval", "3"]) == 0
    assert run(args + ["--metrics-file", split, "--load", str(tmp_path / "ck")]) == 0
    full, resumed = records(tmp_path / "full.jsonl"), records(split)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["fp8"]["mu"] for r in resumed] == [r["fp8"]["mu"] for r in full]


@pytest.mark.slow
def test_fp8_levels_train_to_the_loss_of_none(builtin_corpus_small, tmp_path):
    """300 iterations on the same data; single batches are noisy, so compare the mean training
    loss of the last 50 iterations. At the demo's peak LR (3e-3) with batches of 4 this tiny run
    is chaotic (a 3% change of the LR alone moves the result by 3%); at 1e-3 it is not (0.2%)."""
    finals = {}
    for level in ("none", "O1", "O2", "O3"):
        path = tmp_path / f"{level}.jsonl"
        args = FAST + builtin_corpus_small.training_args() + [
            "--train-iters", "300", "--log-interval", "1", "--global-batch-size", "4", "--lr", "1e-3",
            "--min-lr", "1e-4",
            "--fp8-level", level, "--metrics-file", str(path)]
        assert run(args) == 0
        recs = records(path)
        assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
        finals[level] = sum(r["loss"] for r in recs[-50:]) / 50
        if level != "none":
            assert all(r["fp8"]["mu"] > 0 and 0 <= r["fp8"]["overflow_frac"] < 1e-3 for r in recs)
            assert not any(r["skipped"] for r in recs)
    for level in ("O1", "O2", "O3"):
        assert abs(finals[level] - finals["none"]) / finals["none"] < 0.01, finals


def launch_worker(rank, world_size, argv):
    os.environ["OMP_NUM_THREADS"] = "1"
    return run_cli(lambda: pretrain_gpt.main(argv))


@pytest.mark.slow
@pytest.mark.distributed
def test_fp8_gradient_traffic_and_layouts(builtin_corpus_small, tmp_path):
    base = FAST + builtin_corpus_small.training_args() + ["--train-iters", "4", "--log-interval", "1", "--lr-warmup-iters", "1"]
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    runs = {"none": ["--fp8-level", "none"], "O1": ["--fp8-level", "O1"], "O2": ["--fp8-level", "O2"],
            "O1-tp2": ["--fp8-level", "O1", *tp2], "O2-tp2": ["--fp8-level", "O2", *tp2],
            "O2-zero": ["--fp8-level", "O2", "--use-distributed-optimizer"]}
    for name, flags in runs.items():
        argv = base + flags + ["--metrics-file", str(tmp_path / f"{name}.jsonl")]
        assert run_distributed(launch_worker, 2, argv, init_process_group=False, timeout=300) == [0, 0]
    none, o1, o2, o1_tp2, o2_tp2, o2_zero = (records(tmp_path / f"{n}.jsonl") for n in runs)
    # DP 2: the FP8 linear weights' gradients move one byte per value instead of an FP32 all-reduce's
    # four each way; the rest of the model (embeddings, norms, biases) is reduced as before.
    assert o1[-1]["comm"]["dp_bytes"] == o2[-1]["comm"]["dp_bytes"] < 0.5 * none[-1]["comm"]["dp_bytes"]
    assert all(r["fp8"]["mu"] > 0 for r in o1 + o2 + o1_tp2 + o2_tp2)
    assert o1_tp2[-1]["comm"]["dp_bytes"] == o2_tp2[-1]["comm"]["dp_bytes"] == 0
    for layout in (o1, o2, o1_tp2, o2_tp2):
        assert layout[-1]["loss"] == pytest.approx(none[-1]["loss"], rel=0.02)
    # O2 with the distributed optimizer: the same training, the optimizer states split over DP 2
    # (FP8 weights whole on their owner, the rest in ZeRO-1 shards).
    assert [r["loss"] for r in o2_zero] == pytest.approx([r["loss"] for r in o2], rel=1e-4)
    assert o2_zero[-1]["memory"]["optim_bytes"] < 0.6 * o2[-1]["memory"]["optim_bytes"]


@pytest.mark.slow
@pytest.mark.distributed
def test_o2_with_the_distributed_optimizer_resumes_exactly(builtin_corpus_small, tmp_path):
    args = FAST + builtin_corpus_small.training_args() + [
        "--train-iters", "6", "--log-interval", "1", "--lr-warmup-iters", "1", "--fp8-level", "O2",
        "--use-distributed-optimizer"]
    def launch(argv):
        return run_distributed(launch_worker, 2, argv, init_process_group=False, timeout=300)
    assert launch(args + ["--metrics-file", str(tmp_path / "full.jsonl")]) == [0, 0]
    split = str(tmp_path / "split.jsonl")
    assert launch(args + ["--metrics-file", split, "--save", str(tmp_path / "ck"), "--exit-interval", "3"]) == [0, 0]
    assert launch(args + ["--metrics-file", split, "--load", str(tmp_path / "ck")]) == [0, 0]
    assert [r["loss"] for r in records(split)] == [r["loss"] for r in records(tmp_path / "full.jsonl")]
