"""FP8 pipeline sends (`P2PCommunicator(fp8=True)`, `--fp8-pipeline-p2p`): activations arrive as
their E4M3 round trip and gradients as their E5M2 round trip, one message of payload + scale per
tensor; overflows stay visible; a PP 2 model trains within FP8 tolerance of FP32 sends on a
quarter of the bytes; and the command-line flag reaches the schedule."""

import json
import math
import os

import pytest
import torch

import pretrain_gpt
from distributed import run_distributed
from fp8.tensor import quantize
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func, reported_mean
from megatron.training.cli import run_cli
from test_pipeline_parallel import GLOBAL_BATCH, HIDDEN, SEQ, build, forward_step, global_batches, make_config

SHAPE = (16, 2, HIDDEN)
# The loss sees activations rounded to E4M3 (3 mantissa bits: ~3% RMS per value, unbiased, so the
# mean barely moves); each stage boundary a gradient crosses in E5M2 (2 bits) adds ~5% RMS.
FP8_LOSS_RTOL = 2e-3
NUMEL = math.prod(SHAPE)


def fake_ps(pp_rank: int) -> ParallelState:
    return ParallelState(world_size=2, rank=pp_rank, tp_size=1, pp_size=2, dp_size=1, tp_rank=0, pp_rank=pp_rank,
                         dp_rank=0, device=torch.device("cpu"), backend=None, pp_ranks=(0, 1))


def round_trip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return quantize(x, fmt).dequantize(x.dtype)


def test_message_is_payload_plus_scale():
    for dtype in (torch.float32, torch.bfloat16):
        assert P2PCommunicator(fake_ps(0), SHAPE, dtype, fp8=True).message_nbytes == NUMEL + 4
    assert P2PCommunicator(fake_ps(0), SHAPE, torch.bfloat16).message_nbytes == 2 * NUMEL
    assert P2PCommunicator(fake_ps(0), SHAPE, torch.float32).message_nbytes == 4 * NUMEL


# ----- the communicator on 2 processes ---------------------------------------------------------
def sample(seed: int, dtype: torch.dtype, poison: float | None = None) -> torch.Tensor:
    """The same tensor on both ranks; values over several binades so the scale matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * torch.logspace(-3, 2, SHAPE[-1])
    if poison is not None:
        x[3, 1, 5] = poison
    return x.to(dtype)


def sent_bytes(send, tensor: torch.Tensor, ps: ParallelState) -> int:
    before = ps.counter.snapshot()
    send(tensor)
    return ps.counter.since(before)["pp_bytes"]


def communicator_worker(rank, world_size):
    ps = ParallelState.build(1, 2)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        p2p = P2PCommunicator(ps, SHAPE, dtype, fp8=True)
        name = str(dtype).split(".")[-1]
        act, grad = sample(1, dtype), sample(2, dtype)
        if ps.pp_rank == 0:
            out[f"{name}/act_bytes"] = sent_bytes(p2p.send_forward, act, ps)
            out[f"{name}/grad"] = p2p.recv_backward()
            # both directions in one exchange, as in the 1F1B steady state
            out[f"{name}/grad_pair"] = p2p.send_forward_recv_backward(act)
        else:
            received = p2p.recv_forward()
            out[f"{name}/act"] = received
            out[f"{name}/act_leaf"] = received.is_leaf and received.requires_grad
            out[f"{name}/grad_bytes"] = sent_bytes(p2p.send_backward, grad, ps)
            out[f"{name}/act_pair"] = p2p.send_backward_recv_forward(grad)
    p2p = P2PCommunicator(ps, SHAPE, torch.float32, fp8=True)
    for poison in (float("inf"), float("-inf"), float("nan")):
        if ps.pp_rank == 0:
            p2p.send_forward(sample(3, torch.float32, poison))
            out[f"grad/{poison}"] = p2p.recv_backward()
        else:
            out[f"act/{poison}"] = p2p.recv_forward()
            p2p.send_backward(sample(4, torch.float32, poison))
    for dtype in (torch.float32, torch.bfloat16):  # the bytes of higher-precision sends, to compare
        plain = P2PCommunicator(ps, SHAPE, dtype)
        if ps.pp_rank == 0:
            out[f"plain/{dtype}"] = sent_bytes(plain.send_forward, sample(1, dtype), ps)
        else:
            plain.recv_forward()
    return out


@pytest.mark.distributed
def test_fp8_sends_arrive_as_their_round_trip_in_one_message_each():
    sender, receiver = run_distributed(communicator_worker, 2)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        expected_act = round_trip(sample(1, dtype), "e4m3")
        expected_grad = round_trip(sample(2, dtype), "e5m2")
        for got, want in ((receiver[f"{name}/act"], expected_act), (receiver[f"{name}/act_pair"], expected_act),
                          (sender[f"{name}/grad"], expected_grad), (sender[f"{name}/grad_pair"], expected_grad)):
            assert got.dtype == dtype and torch.equal(got, want)
        assert receiver[f"{name}/act_leaf"]
        assert sender[f"{name}/act_bytes"] == receiver[f"{name}/grad_bytes"] == NUMEL + 4
    assert sender["plain/torch.float32"] == 4 * NUMEL and sender["plain/torch.bfloat16"] == 2 * NUMEL
    assert NUMEL + 4 <= 0.3 * sender["plain/torch.float32"] and NUMEL + 4 <= 0.55 * sender["plain/torch.bfloat16"]
    for poison in ("inf", "-inf", "nan"):
        for got in (receiver[f"act/{poison}"], sender[f"grad/{poison}"]):
            assert not torch.isfinite(got[3, 1, 5]), poison  # an overflow skips the step, never saturates
            assert torch.isfinite(got).sum() == NUMEL - 1


# ----- a PP 2 model through the schedules --------------------------------------------------------
def train(ps: ParallelState, *, fp8: bool, num_layers: int, layers_per_virtual_stage=None, steps: int = 3):
    """Plain SGD on one repeated batch, untied embeddings (so each stage can step alone): the loss
    per step, step 0's gradients by global name, and the pp bytes of step 0's schedule."""
    config = make_config("llama", num_layers)
    chunks = build(ps, config, False, layers_per_virtual_stage)
    model = chunks if len(chunks) > 1 else chunks[0]
    schedule = get_forward_backward_func(ps, len(chunks) if len(chunks) > 1 else None,
                                         tensor_shape=(SEQ, MICRO_BATCH, HIDDEN), fp8_p2p=fp8)
    params = [p for chunk in chunks for p in chunk.parameters()]
    losses, grads, pp_bytes = [], {}, 0
    for step, batch in enumerate(global_batches(steps, repeat=True)):  # one batch, so the loss must fall
        for p in params:
            p.grad = None
        before = ps.counter.snapshot()
        reported = schedule(forward_step=forward_step, data_iterator=iter(batch.split(MICRO_BATCH)), model=model,
                            num_microbatches=GLOBAL_BATCH // MICRO_BATCH)
        if step == 0:
            pp_bytes = ps.counter.since(before)["pp_bytes"]
            grads = {global_name(chunk, n): p.grad.clone() for chunk in chunks for n, p in chunk.named_parameters()}
        losses.append(reported_mean(reported, "loss", ps))
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
    return losses, grads, pp_bytes


MICRO_BATCH = 2
# (name, layers, layers per virtual stage, gradient tolerance): the first interleaved chunk's
# gradients cross three stage boundaries, 1F1B's at most one (a bias gradient, a sum with
# cancellation, shows more relative error than a single value).
SCHEDULE_CASES = [("1f1b", 2, None, 0.12), ("interleaved", 4, 1, 0.16)]


def schedule_worker(rank, world_size):
    ps = ParallelState.build(1, 2)
    return {(name, fp8): train(ps, fp8=fp8, num_layers=layers, layers_per_virtual_stage=per_virtual)
            for name, layers, per_virtual, _ in SCHEDULE_CASES for fp8 in (False, True)}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_trains_within_fp8_tolerance_on_a_quarter_of_the_bytes():
    results = run_distributed(schedule_worker, 2)
    for name, layers, _, grad_rtol in SCHEDULE_CASES:
        ref_losses, ref_grads, _ = train(ParallelState.single(), fp8=False, num_layers=layers)
        fp32_losses, _, fp32_bytes = results[0][(name, False)]
        fp8_losses, _, fp8_bytes = results[0][(name, True)]
        assert fp32_losses == results[1][(name, False)][0] and fp8_losses == results[1][(name, True)][0]
        assert fp32_losses[-1] < fp32_losses[0]
        for fp8_loss, fp32_loss, ref_loss in zip(fp8_losses, fp32_losses, ref_losses):
            assert fp32_loss == pytest.approx(ref_loss, rel=1e-5), name
            assert fp8_loss == pytest.approx(ref_loss, rel=FP8_LOSS_RTOL), name
        assert fp8_bytes <= 0.3 * fp32_bytes, name
        seen = set()
        for rank in range(2):
            fp32_grads, fp8_grads = results[rank][(name, False)][1], results[rank][(name, True)][1]
            for param, want in ref_grads.items():
                if param in fp32_grads:
                    torch.testing.assert_close(fp32_grads[param], want, rtol=1e-4, atol=1e-6)
                    assert relative_error(fp8_grads[param], want) < grad_rtol, (name, param)
                    seen.add(param)
        assert seen == set(ref_grads)


# ----- the command line ------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "64",
       "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
       "--eval-iters", "0", "--lr-warmup-iters", "1", "--train-iters", "4", "--log-interval", "1",
       "--pipeline-model-parallel-size", "2", "--untie-embeddings-and-output-weights"]


def launch_worker(rank, world_size, argv):
    os.environ["OMP_NUM_THREADS"] = "1"
    return run_cli(lambda: pretrain_gpt.main(argv))


@pytest.mark.slow
@pytest.mark.distributed
def test_fp8_pipeline_p2p_flag_reaches_the_schedule(builtin_corpus_small, tmp_path):
    """Untied embeddings, so the pp bytes are the sends alone (plus the loss broadcast)."""
    runs = {"fp32": ["--fp8-level", "O2"], "fp8": ["--fp8-level", "O2", "--fp8-pipeline-p2p"]}
    logs = {}
    for name, flags in runs.items():
        path = tmp_path / f"{name}.jsonl"
        argv = CLI + builtin_corpus_small.training_args() + flags + ["--metrics-file", str(path)]
        assert run_distributed(launch_worker, 2, argv, init_process_group=False, timeout=300) == [0, 0]
        logs[name] = [json.loads(line) for line in path.read_text().splitlines()]
    fp32, fp8 = logs["fp32"], logs["fp8"]
    assert fp8[-1]["comm"]["pp_bytes"] <= 0.3 * fp32[-1]["comm"]["pp_bytes"]
    assert not any(r["skipped"] for r in fp8)
    for got, want in zip(fp8, fp32):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
