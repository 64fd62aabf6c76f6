"""What every benchmark script shares: where results go and what each JSON records about the run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_meta(script: str, argv: list[str] | None, **extra) -> dict:
    """Date, machine and the command line, so a figure can be quoted with all three."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "host": platform.node(),
            "command": " ".join(["python", f"bench/{script}"] + (argv if argv is not None else sys.argv[1:])),
            **extra}


def save_results(out: str | Path, meta: dict, **payload) -> Path:
    """Write {"meta": ..., **payload} as JSON, atomically; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, **payload}, indent=1))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return out
