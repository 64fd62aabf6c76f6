"""Run a function in N real torch.distributed processes and collect what each returns.

    results = run_distributed(check_something, 2, arg)   # [rank0_result, rank1_result]

`fn(rank, world_size, *args)` must be importable (a module-level function of a test module) and
return something picklable; tensors are fine. The helper initialises the default process group
(gloo on CPU) and nothing else. A worker's exception fails the caller with that worker's traceback;
a hang is killed after `timeout` seconds. Starting processes costs seconds on a small machine, so a
test should run several checks per start.

Workers are forked from a forkserver that imported torch once (a fresh interpreter per worker
costs seconds), and results come back through torch.save, which carries float8 tensors.
Rendezvous goes through a TCPStore that this (parent) process hosts on a port the OS picks, so
concurrent test runs on one machine cannot race for a port.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0


class DistributedWorkerError(AssertionError):
    """A worker raised; the message carries its rank and traceback."""


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = DEFAULT_TIMEOUT_S,
                    init_process_group: bool = True) -> list:
    """Runs ``fn(rank, world_size, *args)`` in `world_size` processes; returns results in rank order.

    With ``init_process_group=False`` the workers get torchrun's environment variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) instead, for code that initialises itself.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    context = _context()
    results_queue = context.Queue()
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    # The forkserver's environment and sys.path date from its start; workers get the caller's now.
    launch = {"port": store.port if init_process_group else _free_port(), "backend": backend,
              "timeout": timeout, "init": init_process_group, "environ": dict(os.environ),
              "sys_path": list(sys.path), "job": _pickle_job(fn, args)}
    processes = [context.Process(target=_worker_main, args=(rank, world_size, launch, results_queue),
                                 daemon=True, name=f"dist-rank-{rank}") for rank in range(world_size)]
    try:
        for process in processes:
            process.start()
        return _collect(processes, results_queue, timeout)
    finally:
        # Every result is in (or one failed), so nothing is lost by not waiting for teardown.
        _stop(processes)
        del store


def _context():
    """A forkserver that has imported torch once, so each worker is a cheap fork rather than a fresh
    interpreter importing torch (seconds each on a small machine); spawn where there is none."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "megatron.core.parallel_state"])
    return context


def _pickle_job(fn, args: tuple) -> bytes:
    try:
        return _dumps((fn, args))
    except Exception as error:  # noqa: BLE001 - pickling raises several unrelated types
        raise ValueError(f"run_distributed needs a module-level function and picklable arguments "
                         f"(workers import them by name): {error}") from error


def _worker_main(rank: int, world_size: int, launch: dict, results_queue) -> None:
    torch.set_num_threads(1)  # the machine is shared; N workers must not each take every core
    os.environ.clear()
    os.environ.update(launch["environ"])
    sys.path[:] = launch["sys_path"]
    try:
        fn, args = _loads(launch["job"])
        if launch["init"]:
            _init_process_group(rank, world_size, launch)
        else:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch["port"]))
        result = fn(rank, world_size, *args)
        payload = ("ok", _dumps(result))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, even SystemExit
        payload = ("error", traceback.format_exc())
    results_queue.put((rank, *payload))
    if payload[0] == "ok" and dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while a peer may still be talking to it
        dist.destroy_process_group()


def _dumps(result) -> bytes:
    # torch.save rather than pickle: plain pickling of float8 tensors fails in some torch versions,
    # and bytes keep tensors out of torch.multiprocessing's shared-memory handoff.
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _loads(payload: bytes):
    return torch.load(io.BytesIO(payload), weights_only=False)


def _init_process_group(rank: int, world_size: int, launch: dict) -> None:
    timeout = datetime.timedelta(seconds=launch["timeout"])
    if "nccl" in launch["backend"]:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = dist.TCPStore("127.0.0.1", launch["port"], None, False, timeout=timeout)
    dist.init_process_group(launch["backend"], store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _collect(processes, results_queue, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    results, errors = {}, {}
    while len(results.keys() | errors.keys()) < len(processes) and time.monotonic() < deadline:
        try:
            rank, status, payload = results_queue.get(timeout=0.2)
        except queue.Empty:
            for rank, process in enumerate(processes):
                if process.exitcode not in (None, 0) and rank not in results and rank not in errors:
                    # Give a message it may have in flight the chance to arrive first.
                    errors[rank] = f"process exited with code {process.exitcode} without a result"
                    deadline = min(deadline, time.monotonic() + 1.0)
            continue
        if status == "ok":
            results[rank] = _loads(payload)
        else:
            errors[rank] = payload
            deadline = min(deadline, time.monotonic() + 2.0)  # a short grace for peers' errors
    if errors:
        raise DistributedWorkerError("\n".join(f"rank {rank} failed:\n{text}" for rank, text in sorted(errors.items())))
    missing = sorted(set(range(len(processes))) - results.keys())
    if missing:
        raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (a collective "
                           f"that not every rank called, or a deadlock)")
    return [results[rank] for rank in range(len(processes))]


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
