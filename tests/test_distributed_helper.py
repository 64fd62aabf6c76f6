"""The multi-process test helper itself: results in rank order, worker errors with tracebacks,
and a hang that ends in a TimeoutError instead of a stuck test run."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distributed import DistributedWorkerError, run_distributed


def _rank_info(rank, world_size, scale):
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return {"rank": rank, "world": world_size, "sum": total.item() * scale, "threads": torch.get_num_threads()}


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise KeyError("deliberate failure")
    dist.barrier()  # rank 0 would wait forever for rank 1
    return rank


def _hangs(rank, world_size):
    if rank == 0:
        time.sleep(60)
    return rank


@pytest.mark.distributed
def test_results_come_back_in_rank_order():
    results = run_distributed(_rank_info, 3, 2.0)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 and r["sum"] == 6.0 and r["threads"] == 1 for r in results)


@pytest.mark.distributed
def test_worker_exception_fails_with_its_traceback():
    started = time.monotonic()
    with pytest.raises(DistributedWorkerError, match="rank 1 failed") as failure:
        run_distributed(_fails_on_rank_one, 2)
    assert "KeyError: 'deliberate failure'" in str(failure.value)
    assert "_fails_on_rank_one" in str(failure.value)
    assert time.monotonic() - started < 30


@pytest.mark.distributed
def test_a_hang_times_out():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish"):
        run_distributed(_hangs, 2, timeout=3)


def _reads_environment(rank, world_size):
    import os

    return os.environ.get("FP8LM_HELPER_PROBE")


@pytest.mark.distributed
def test_workers_see_the_callers_environment(monkeypatch):
    monkeypatch.setenv("FP8LM_HELPER_PROBE", "set-after-the-forkserver-started")
    assert run_distributed(_reads_environment, 2) == ["set-after-the-forkserver-started"] * 2


def test_local_functions_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="module-level function"):
        run_distributed(lambda rank, world_size: rank, 2)
