"""ZeRO-2 for the dense gradients at O3 (DP > 1): only this rank's chunk of each dense gradient
bucket stays between steps; a bucket's full buffer lives from backward's first write into it to
its reduce-scatter. The same sums as keeping the whole buffer (ZeRO-1), so the same bits: losses,
gradient norms and weights, also with a tied embedding split over pipeline stages (whose
all-reduce then runs on the kept chunk) and with overlapped reduction."""

import json
import os

import pytest
import torch

from distributed import run_distributed
from test_plan import assert_matches, planner
from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.parallel_state import ParallelState

pytestmark = pytest.mark.distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--eval-iters", "0", "--lr-warmup-iters", "1", "--train-iters", "3", "--log-interval", "1",
        "--ddp-bucket-size", "3000", "--fp8-level", "O3"]
CASES = {
    "dp4": [],
    "pp2-dp2-tied": ["--pipeline-model-parallel-size", "2", "--num-layers", "2"],  # tied by default
    "dp4-overlap": ["--overlap-grad-reduce", "--overlap-param-gather"],
}


def trainings(rank, world_size, data_args, folder):
    import pretrain_gpt

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    init = DistributedDataParallel.__init__
    for name, flags in CASES.items():
        for sharded in (True, False):
            def patched(self, *args, **kwargs):  # the ZeRO-1 reference: the trainer's O3 asks for ZeRO-2
                init(self, *args, **dict(kwargs, shard_dense_grads=kwargs.get("shard_dense_grads") and sharded))
            DistributedDataParallel.__init__ = patched
            try:
                metrics = os.path.join(folder, f"{name}-{'zero2' if sharded else 'zero1'}.jsonl")
                assert pretrain_gpt.main(BASE + data_args + flags + ["--metrics-file", metrics]) == 0
            finally:
                DistributedDataParallel.__init__ = init
    return True


def read(folder, name):
    with open(os.path.join(folder, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_zero2_is_bit_identical_to_zero1_and_holds_a_chunk(builtin_corpus_small, tmp_path):
    run_distributed(trainings, 4, builtin_corpus_small.training_args(), str(tmp_path), timeout=600)
    for name in CASES:
        zero1, zero2 = read(tmp_path, f"{name}-zero1"), read(tmp_path, f"{name}-zero2")
        for a, b in zip(zero1, zero2):
            assert (a["loss"], a["grad_norm"], a["fp8"]) == (b["loss"], b["grad_norm"], b["fp8"]), name
            assert (a["comm"]["dp_bytes"], a["comm"]["tp_bytes"]) == (b["comm"]["dp_bytes"], b["comm"]["tp_bytes"])
            if name.startswith("pp2"):  # the tied embedding's all-reduce runs on the kept chunk: 1/DP of it
                assert b["comm"]["pp_bytes"] < a["comm"]["pp_bytes"], name
            else:
                assert a["comm"]["pp_bytes"] == b["comm"]["pp_bytes"] == 0
        # The planner's bytes for the layout equal rank 0's record (states and every group's traffic).
        plan = planner.make_plan(BASE + builtin_corpus_small.training_args() + CASES[name], 2 if "pp2" in name else 4)
        assert_matches(plan, zero2[-1], name)
        m1, m2 = zero1[-1]["memory"], zero2[-1]["memory"]
        dp = 2 if name.startswith("pp2") else 4
        full = m2["dense_grad_peak_bytes"]
        assert "dense_grad_peak_bytes" not in m1
        # ZeRO-1 keeps every dense bucket whole; ZeRO-2 one chunk of each (1/DP of the padded buckets).
        assert m1["grad_bytes"] - m2["grad_bytes"] == full - full // dp, name
        assert m2["state_bytes_per_param"] < m1["state_bytes_per_param"]


def held_storage(rank, world_size):
    """Bytes the dense gradients hold between steps, from the tensors' storage, sharded or not."""
    from test_overlap_grad_reduce import _model

    ps = ParallelState.build()
    out = {}
    for sharded in (False, True):
        model, precision = _model(ps, "O3")
        ddp = DistributedDataParallel(model, ps, bucket_size_mb=0.004, precision=precision,
                                      use_distributed_optimizer=True, shard_dense_grads=sharded)
        tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(rank))
        ddp.zero_grad_buffer()
        ddp(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        during = sum(b.buffer.untyped_storage().nbytes() for b in ddp.grad_buffer.buckets
                     if b.buffer is not None and b.buffer.untyped_storage().data_ptr()
                     != ddp.grad_buffer.data.untyped_storage().data_ptr())
        ddp.finish_grad_sync()
        kept = ddp.grad_buffer.data.untyped_storage().nbytes() + sum(
            b.buffer.untyped_storage().nbytes() for b in ddp.grad_buffer.buckets
            if b.buffer is not None and b.buffer.untyped_storage().data_ptr()
            != ddp.grad_buffer.data.untyped_storage().data_ptr())
        owned = torch.cat([b.shard(ps.dp_rank, ps.dp_size) for b in ddp.grad_buffer.buckets])
        out[sharded] = (during, kept, ddp.grad_buffer.nbytes, 4 * ddp.grad_buffer.full_numel, owned, [b.numel for b in ddp.grad_buffer.buckets])
    return out


def test_zero2_keeps_one_chunk_of_storage():
    for result in run_distributed(held_storage, 2):
        during1, kept1, counted1, full, owned1, n1 = result[False]
        during2, kept2, counted2, full2, owned2, n2 = result[True]
        assert full == full2, (full, full2, n1, n2)
        assert (kept1, counted1, during1) == (full, full, 0)  # ZeRO-1: one whole buffer
        # ZeRO-2: at the end of backward the full buffer of every bucket backward wrote into - all
        # but the last, which holds only the model's unused `extra` (padded to 2 x 128) ...
        assert n2[-1] == 256 and during2 == full - 4 * n2[-1]
        assert kept2 == counted2 == full // 2  # ... and only this rank's chunks after the reduction
        assert torch.equal(owned1, owned2)  # the same reduced gradients
