#!/usr/bin/env python
"""torchrun whose workers may finish after a SIGTERM: the launcher of scripts/slurm_pretrain.sh.

    python scripts/torchrun_graceful.py TORCHRUN_ARGS... pretrain_gpt.py ARGS...

Takes torchrun's arguments. SLURM sends SIGTERM to every process of a job step: before the time
limit (`--signal`), on `scancel`, on preemption. Stock torchrun answers it by passing the signal
to its workers, killing them 30 s later and exiting 1, so a job whose workers saved a checkpoint
and exited 0 still ends FAILED and `afterok` dependencies never start. Here a SIGTERM is passed
to the workers and torchrun keeps watching them: workers that save and exit 0 make it exit 0
(the step and the job end COMPLETED); a worker that does not exit is killed by SLURM after the
limit (KillWait). Other signals (SIGINT, SIGHUP, SIGQUIT) keep torchrun's behaviour.

No SIGTERM is lost during start-up: one that reaches torchrun before its workers exist is passed
on when they start, and the workers start with SIGTERM blocked, so one that reaches them while
they import is held pending until the entry point takes it over (`megatron.training.cli.run_cli`
installs the handler that the training loop reads, then unblocks it); the training loop then
saves and exits at the first iteration boundary.
"""

from __future__ import annotations

import os
import signal
import sys

# Installed before the slow imports below: a SIGTERM from now on is remembered.
_received: list[int] = []
signal.signal(signal.SIGTERM, lambda signum, frame: _received.append(signum))

from torch.distributed import run  # noqa: E402
from torch.distributed.elastic.multiprocessing import api  # noqa: E402

_contexts: list = []  # the worker groups started so far (one per restart)


def _say(message: str) -> None:
    print(f"torchrun_graceful (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)


def _pass_on(context) -> None:
    for pid in context.pids().values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # already gone
            pass


def _on_signal(signum: int, frame) -> None:
    if signum != signal.SIGTERM:
        _stock_handler(signum, frame)  # raises SignalException: torchrun shuts down as usual
        return
    _received.append(signum)
    _say("SIGTERM passed to the workers; waiting for them to save and exit")
    for context in _contexts:
        _pass_on(context)


def _start(self) -> None:
    """PContext.start with SIGTERM blocked while the workers are spawned (they inherit the mask)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        _stock_start(self)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _contexts.append(self)
    if _received:
        _say("SIGTERM received before the workers started; passed to them")
        _pass_on(self)


_stock_handler = getattr(api, "_terminate_process_handler", None)
_stock_start = getattr(getattr(api, "PContext", None), "start", None)


def main() -> None:
    if _stock_handler is None or _stock_start is None:
        import torch

        _say(f"torch {torch.__version__} lacks the hooks this launcher needs; running stock torchrun")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if _received:
            sys.exit(128 + signal.SIGTERM)
    else:
        # PContext.start registers `_terminate_process_handler` by name: this one takes its place.
        api._terminate_process_handler = _on_signal
        api.PContext.start = _start
    sys.argv[0] = "torchrun"
    run.main()


if __name__ == "__main__":
    main()
