"""Entry-point wrapper: user mistakes end as one line on stderr and exit code 2 (DESIGN.md).

User mistakes are `ValueError`s (configs, flags, data files) and missing files. Anything else
is a bug and keeps its traceback. Set FP8LM_TRACEBACK=1 to see the traceback of a user error too.

Every rank that hits a user error prints its line (rank 0 as ``error: ...``, another rank as
``error: [rank N] ...``), flushed before anything else happens: under torchrun the agent ends the
other ranks as soon as one exits, so a line left to rank 0 is lost when only rank 1 saw the
problem. A check that every rank makes alike therefore prints once per rank.

SIGTERM: a training entry point may ask for it to be deferred (`defer_sigterm=True`): a SIGTERM
from then on, during start-up included, is remembered and the training loop saves and exits at
its next iteration boundary, exit code 0. A launcher asks for the same by starting the process
with SIGTERM blocked (scripts/torchrun_graceful.py does, under SLURM). Otherwise SIGTERM keeps
its default action until the training loop starts listening.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

import torch.distributed as dist

EXIT_USAGE = 2


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def error_line(exc: BaseException) -> str:
    """The one line a user error prints, with the rank that hit it when that is not rank 0."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    rank = _rank()
    return f"error: [rank {rank}] {message}" if rank else f"error: {message}"


def _sigterm_blocked() -> bool:
    return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def run_cli(main: Callable[[], int | None], *, defer_sigterm: bool | None = None) -> int:
    """Run `main` as a command: its return value (None: 0) is the exit code. `defer_sigterm`:
    see the module's docstring; None defers where the launcher asked for it."""
    latch = None
    if defer_sigterm or (defer_sigterm is None and _sigterm_blocked()):
        from megatron.training.resume import SigtermLatch

        latch = SigtermLatch.install()
    try:
        return main() or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        if os.environ.get("FP8LM_TRACEBACK"):
            raise
        print(error_line(exc), file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        if latch is not None:
            latch.uninstall()
        sys.stderr.flush()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
