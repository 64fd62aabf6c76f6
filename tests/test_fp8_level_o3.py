"""Level O3, FP8 ZeRO: against O2 with the distributed optimizer at DP 2 and 4 (the same losses, the
owners' masters equal to O2's, every rank's FP8 weights equal to O2's masters quantized, all to the
bit), bytes per parameter, balance, the FP8
weights' data-parallel traffic against `none` with the distributed optimizer, skipped steps, and
through `pretrain_gpt`: exact resume, resuming at another DP size, TP 2 x PP 2 x DP 2 on 8
processes, and 300 iterations to the loss of `none`."""

import json
import math
import os

import pytest
import torch

import pretrain_gpt
from distributed import run_distributed
from fp8.params import is_fp8_param, param_value, quantize_fp8_weight
from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.factory import build_optimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.precision import FP8Config, apply_precision
from megatron.core.transformer.config import TransformerConfig
from megatron.training.cli import run_cli
from megatron.training.training import memory_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--eval-iters", "0", "--lr-warmup-iters", "5"]
GLOBAL_BATCH, SEQ, STEPS, VOCAB = 8, 16, 3, 64


# ----- O3 against O2, built directly -------------------------------------------------------------
def build(ps: ParallelState, level: str, *, dtype=torch.float32, zero: bool = False):
    """Four layers of 256: the FP8 weights are 99% of the parameters and split evenly over 2 or 4
    owners, as in a large model; several buckets."""
    config = TransformerConfig(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=VOCAB,
                               max_position_embeddings=SEQ, ffn_hidden_size=1024, hidden_dropout=0.0,
                               attention_dropout=0.0, params_dtype=dtype)
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=5)
    fp8 = FP8Config(level=level, recipe="current", min_features=64)
    precision = apply_precision(model, fp8, ps, bucket_size_mb=0.5)
    ddp = DistributedDataParallel(model, ps, bucket_size_mb=0.5, use_distributed_optimizer=zero, precision=precision)
    config = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0)
    optimizer = build_optimizer(list(model.named_parameters()), config, ps, ddp, precision,
                                use_distributed_optimizer=zero)
    return model, ddp, optimizer


def batches(ps: ParallelState):
    g = torch.Generator().manual_seed(11)
    per_rank = GLOBAL_BATCH // ps.dp_size
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)[ps.dp_rank * per_rank:][:per_rank]
            for _ in range(STEPS)]


def train(ps, model, ddp, optimizer, *, poison_step: int | None = None, steps: int = STEPS) -> list[tuple[float, bool]]:
    out = []
    for step, tokens in enumerate(batches(ps)[:steps]):
        ddp.zero_grad_buffer()
        loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean()
        loss.backward()
        if step == poison_step and ps.dp_rank == ps.dp_size - 1:
            ddp.fp8_grads.get(ddp.fp8_grad_params[0]).data.view(-1)[0] = float("nan")
        ddp.finish_grad_sync()
        out.append((loss.item(), optimizer.step().skipped))
    return out


def o3_against_o2(rank, world_size):
    ps = ParallelState.build(1, 1)
    # The reference differs from O3 only in what O3 changes: O2 also shards the dense parameters
    # with the distributed optimizer, so both sum the gradient norm in the same order (with the
    # dense part unsharded the clip coefficient can differ by one ulp, by CPU kernel).
    m2, d2, o2 = build(ps, "O2", zero=True)
    m3, d3, o3 = build(ps, "O3", zero=True)
    result = {"o2": train(ps, m2, d2, o2), "o3": train(ps, m3, d3, o3)}
    weights2, weights3 = dict(m2.named_parameters()), dict(m3.named_parameters())
    master_err, weight_mismatch, payloads = 0.0, 0, {}
    for name, param in weights3.items():
        if not is_fp8_param(param):
            master_err = max(master_err, (param.float() - weights2[name].float()).abs().max().item())
            continue
        expected, scale = quantize_fp8_weight(param_value(weights2[name]), param.cast, param.scale)
        weight_mismatch += int(not torch.equal(param.view(torch.uint8), expected.view(torch.uint8))
                               or not torch.equal(param.scale, scale))
        payloads[name] = param.detach().view(torch.uint8).clone()
    for param, master in o3.parts[1].masters.items():
        name = next(n for n, p in weights3.items() if p is param)
        master_err = max(master_err, (param_value(master) - param_value(weights2[name])).abs().max().item())
    result.update(master_err=master_err, weight_mismatch=weight_mismatch, payloads=payloads,
                  owned=len(o3.parts[1].owned), loads=d3.fp8_zero.owner_state_bytes(),
                  memory=memory_record(m3, d3, o3, sum(p.numel() for p in m3.parameters())),
                  memory_o2=memory_record(m2, d2, o2, sum(p.numel() for p in m2.parameters())),
                  skip=skipped_step_changes_nothing(ps, m3, d3, o3))
    return result


def skipped_step_changes_nothing(ps, model, ddp, optimizer) -> bool:
    before = {n: param_value(p).clone() for n, p in model.named_parameters()}
    masters = {p: param_value(m).clone() for p, m in optimizer.parts[1].masters.items()}
    results = train(ps, model, ddp, optimizer, poison_step=0, steps=1)
    unchanged = all(torch.equal(param_value(p), before[n]) for n, p in model.named_parameters())
    unchanged &= all(torch.equal(param_value(m), masters[p]) for p, m in optimizer.parts[1].masters.items())
    return results[0][1] and unchanged


def weight_traffic(rank, world_size):
    """One BF16 step of `none` with the distributed optimizer and of O3: data-parallel bytes."""
    ps = ParallelState.build(1, 1)
    out = {}
    for level in ("none", "O3"):
        model, ddp, optimizer = build(ps, level, dtype=torch.bfloat16, zero=True)
        before = ps.counter.snapshot()
        train(ps, model, ddp, optimizer)
        out[level] = ps.counter.since(before)["dp_bytes"] / STEPS
        if level == "O3":
            out["fp8_weight_bytes"] = ddp.fp8_stats["dp_bytes"] + optimizer.publish_dp_bytes
            out["fp8_numel"] = sum(p.numel() for p in ddp.fp8_grad_params)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("dp", [2, 4])
def test_o3_takes_o2s_steps_to_the_bit(dp):
    results = run_distributed(o3_against_o2, dp, timeout=300)
    for r in results:
        # FP8 ZeRO moves the same sums to the owners and re-quantizes the same masters: O2's steps.
        assert [loss for loss, _ in r["o3"]] == [loss for loss, _ in r["o2"]]
        assert not any(skipped for _, skipped in r["o2"] + r["o3"])
        assert r["master_err"] == 0 and r["weight_mismatch"] == 0
        assert r["skip"]
    for name, payload in results[0]["payloads"].items():  # every rank holds the same FP8 weights
        assert all(torch.equal(r["payloads"][name], payload) for r in results[1:]), name
    assert sum(r["owned"] for r in results) == 16
    loads = results[0]["loads"]
    assert max(loads) == min(loads)  # 4 layers x 4 weight shapes: the greedy partition is exact here
    memory = results[0]["memory"]
    # Between steps: 1 (FP8 weight) + (1 FP8 gradient + 2 master + 1 m + 2 v) / DP, plus scales;
    # at the end of backward every rank holds every FP8 gradient (+1): 2 + 5 / DP.
    assert memory["fp8_state_bytes_per_param"] == pytest.approx(1 + 6 / dp, abs=0.01)
    assert memory["fp8_grad_peak_bytes"] / memory["fp8_params"] == pytest.approx(1, abs=0.01)
    if dp == 4:
        assert memory["state_bytes_per_param"] <= 2 + 5 / 4 + 0.1
    assert memory["weight_bytes"] < 0.55 * results[0]["memory_o2"]["weight_bytes"]


@pytest.mark.distributed
def test_fp8_weight_traffic_is_a_third_of_bf16_zero():
    r = run_distributed(weight_traffic, 2, timeout=300)[0]
    dense = r["O3"] - r["fp8_weight_bytes"]  # the rest of the model moves alike at both levels
    linear_none = r["none"] - dense
    # FP32 reduce-scatter + BF16 all-gather (6 bytes per weight) against FP8 both ways (2)
    assert linear_none == pytest.approx(0.5 * 6 * r["fp8_numel"], rel=0.01)
    assert r["fp8_weight_bytes"] / linear_none <= 0.34
    assert r["O3"] / r["none"] < 0.4


# ----- end to end --------------------------------------------------------------------------------
def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def launch_worker(rank, world_size, argv):
    os.environ["OMP_NUM_THREADS"] = "1"
    return run_cli(lambda: pretrain_gpt.main(argv))


def launch(n, argv):
    return run_distributed(launch_worker, n, argv, init_process_group=False, timeout=400)


@pytest.mark.slow
@pytest.mark.distributed
def test_o3_resumes_exactly_and_at_another_dp_size(builtin_corpus_small, tmp_path):
    args = FAST + builtin_corpus_small.training_args() + [
        "--train-iters", "6", "--log-interval", "1", "--lr-warmup-iters", "1", "--fp8-level", "O3"]
    assert launch(2, args + ["--metrics-file", str(tmp_path / "full.jsonl")]) == [0, 0]
    split = str(tmp_path / "split.jsonl")
    assert launch(2, args + ["--metrics-file", split, "--save", str(tmp_path / "ck"), "--exit-interval", "3"]) == [0, 0]
    assert launch(2, args + ["--metrics-file", split, "--load", str(tmp_path / "ck")]) == [0, 0]
    full = records(tmp_path / "full.jsonl")
    assert [r["loss"] for r in records(split)] == [r["loss"] for r in full]
    # Saved by 2 owners, loaded by 4: re-partitioned masters and moments give the same steps up to
    # the order of the FP8 gradient sums.
    dp4 = str(tmp_path / "dp4.jsonl")
    assert launch(4, args + ["--metrics-file", dp4, "--load", str(tmp_path / "ck"), "--micro-batch-size", "2"]) == [0] * 4
    resumed = records(dp4)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[3:]], rel=2e-3)


@pytest.mark.slow
@pytest.mark.distributed
def test_o3_trains_with_tp2_pp2_dp2(builtin_corpus_small, tmp_path):
    args = FAST + builtin_corpus_small.training_args() + [
        "--train-iters", "8", "--log-interval", "1", "--lr-warmup-iters", "1", "--fp8-level", "O3",
        "--micro-batch-size", "2"]
    assert run_cli(lambda: pretrain_gpt.main(args + ["--metrics-file", str(tmp_path / "one.jsonl")])) == 0
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"]
    assert launch(8, args + layout + ["--metrics-file", str(tmp_path / "eight.jsonl")]) == [0] * 8
    one, eight = records(tmp_path / "one.jsonl"), records(tmp_path / "eight.jsonl")
    assert [r["loss"] for r in eight] == pytest.approx([r["loss"] for r in one], rel=0.02)
    assert eight[-1]["loss"] < eight[0]["loss"]
    assert not any(r["skipped"] for r in eight)
    assert all(r["comm"][key] > 0 for r in eight for key in ("dp_bytes", "tp_bytes", "pp_bytes"))
    assert math.isfinite(eight[-1]["grad_norm"])


@pytest.mark.slow
def test_o3_finetune_starts_from_the_trained_weights(builtin_corpus_small, tmp_path):
    """--finetune takes weights, not moments: the owners' FP16 masters must follow the loaded
    weights, or the first step would publish the masters' initial values. At LR 0 a step keeps
    every weight, so the weights saved after it are those loaded."""
    args = FAST + builtin_corpus_small.training_args() + ["--log-interval", "1", "--fp8-level", "O3", "--lr-warmup-iters", "0"]
    assert run_cli(lambda: pretrain_gpt.main(args + ["--train-iters", "3", "--save", str(tmp_path / "a")])) == 0
    tuned = args + ["--train-iters", "1", "--lr", "0", "--min-lr", "0", "--load", str(tmp_path / "a"), "--finetune",
                    "--save", str(tmp_path / "b")]
    assert run_cli(lambda: pretrain_gpt.main(tuned)) == 0
    trained = torch.load(tmp_path / "a" / "iter_0000003" / "rank_00000.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "b" / "iter_0000001" / "rank_00000.pt", weights_only=True)["model"]
    assert trained.keys() == after.keys()
    for name, entry in trained.items():
        assert torch.equal(entry["tensor"], after[name]["tensor"]), name
