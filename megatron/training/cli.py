"""Entry-point wrapper: user mistakes end as one line on stderr and exit code 2 (DESIGN.md).

User mistakes are `ValueError`s (configs, flags, data files) and missing files. Anything else
is a bug and keeps its traceback. Set FP8LM_TRACEBACK=1 to see the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch.distributed as dist

EXIT_USAGE = 2


def _is_rank0() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def run_cli(main: Callable[[], int | None]) -> int:
    try:
        return main() or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("FP8LM_TRACEBACK"):
            raise
        if _is_rank0():
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
