"""A thread that runs data-parallel collectives while the main thread computes.

Overlapped gradient reduction (`DistributedDataParallel(overlap_grad_reduce=True)`) hands each
bucket's reduction to one `CommWorker` as soon as backward has produced the bucket's last
gradient, and waits for all of them before the optimizer step. The worker issues its collectives
over a process group of its own - the same ranks as the data-parallel group, created for it - so
the main thread's collectives (tensor-parallel all-reduces inside backward, pipeline sends, the
logging all-reduces) never interleave with the worker's on one group: every rank's worker runs
the same jobs in the same order, and every rank's main thread the same collectives in its order.

The FP8 reduction (re-cast, all-to-all, FP32 sums, all-gather) is a chain of collectives with
computation between them, so it cannot be one asynchronous call; a thread runs the chain as
written. gloo's collectives and PyTorch's kernels release the GIL, so on CPU the worker's
collectives and sums run while backward computes. On CUDA the worker runs on a stream of its own,
which first waits for what backward had queued when the job was handed over (an event), and the
main stream waits for the worker's stream before the optimizer reads a gradient.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelState, group_layout


def worker_state(ps: ParallelState) -> ParallelState:
    """`ps` with a data-parallel group of the worker's own (same ranks). Collective over the
    world: every rank must call it, in the same order relative to other group creations."""
    if ps.dp_size == 1 or ps.dp_group is None:
        return ps
    mine = None
    for ranks in group_layout(ps.world_size, ps.tp_size, ps.pp_size).dp:
        group = dist.new_group(list(ranks))
        if ps.rank in ranks:
            mine = group
    assert mine is not None
    return ps.replace(dp_group=mine)


class Job:
    """A submitted job; `wait()` blocks until it has run (on CUDA: and makes the current stream
    wait for the worker's stream at that point) and re-raises its error."""

    def __init__(self, fn: Callable[[], None], ready_event):
        self.fn, self.ready_event = fn, ready_event
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.finished_event = None  # CUDA: recorded on the worker's stream after the job

    def wait(self) -> None:
        self.done.wait()
        if self.finished_event is not None:
            torch.cuda.current_stream().wait_event(self.finished_event)
        if self.error is not None:
            raise self.error


class CommWorker:
    """Runs submitted jobs one after another, in submission order, on a daemon thread."""

    def __init__(self, device: torch.device, name: str = "fp8lm-comm"):
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._jobs: queue.Queue = queue.Queue()
        self._pending = 0
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> Job:
        """Queue `fn`; on CUDA it will see everything the current stream has queued so far."""
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        job = Job(fn, event)
        with self._done:
            self._pending += 1
        self._jobs.put(job)
        return job

    def wait(self) -> None:
        """Block until every submitted job has run; re-raise the first error a job raised (the
        jobs after it are skipped: a failed collective leaves the group unusable anyway)."""
        with self._done:
            while self._pending:
                self._done.wait()
            error, self._error = self._error, None
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        if error is not None:
            raise error

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self._error is None:
                    self._run(job)
                else:
                    job.error = self._error
            except BaseException as exc:  # handed to the main thread by `wait`
                self._error = job.error = exc
            finally:
                job.done.set()
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    @torch.no_grad()  # grad mode is per thread: the jobs update tensors, they build no graph
    def _run(self, job: Job) -> None:
        if self._stream is None:
            job.fn()
            return
        self._stream.wait_event(job.ready_event)
        with torch.cuda.stream(self._stream):
            job.fn()
        job.finished_event = torch.cuda.Event()
        job.finished_event.record(self._stream)
