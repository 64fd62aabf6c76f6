"""Reference runs for refactoring: the per-iteration losses (to the bit), grad norms, bytes held and
bytes sent of short pretraining runs at every level and layout, recorded once and compared after a
change that must not change behaviour.

    python bench/reference_runs.py --out bench/results/reference-before.json
    ... change the code ...
    python bench/reference_runs.py --compare bench/results/reference-before.json

Each run is one `torchrun` launch of pretrain_gpt.py on configs/gpt-tiny.yaml and the built-in
corpus (the `make pretrain` model), 12 iterations. Losses are compared as exact float64 bit
patterns: a refactor that reorders one floating-point sum shows up. Only runs on the same machine
(same CPU kernels) are comparable. `--compare` exits 1 and names every difference.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from bench.train_step import corpus_args, launch  # noqa: E402

ITERS = 12
SHORT = ["--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--device", "cpu"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
# (name, processes, flags): the demo's layout at every level, then the other layouts at O3.
RUNS = [(f"tp2-sp-{level}", 2, TP2 + ["--fp8-level", level]) for level in ("none", "O0", "O1", "O2", "O3")] + [
    ("dp2-none-zero", 2, ["--fp8-level", "none", "--use-distributed-optimizer"]),
    ("dp2-O2", 2, ["--fp8-level", "O2"]),
    ("dp2-O3", 2, ["--fp8-level", "O3"]),
    ("pp2-O3", 2, ["--fp8-level", "O3", "--pipeline-model-parallel-size", "2"]),
    ("tp2-sp-O3-bf16-rs", 2, TP2 + ["--fp8-level", "O3", "--no-fp8-reduce-scatter"]),
]


def bits(x: float | None) -> str | None:
    return None if x is None else struct.pack(">d", x).hex()


def record(name: str, nproc: int, flags: list[str], data: list[str]) -> dict:
    result = launch(nproc, SHORT + data + flags, ITERS, name, interval=1)
    return {"losses": [bits(r["loss"]) for r in result["records"]],
            "grad_norms": [bits(r["grad_norm"]) for r in result["records"]],
            "memory": result["memory"], "comm": [r["comm"] for r in result["records"]],
            "fp8": [r.get("fp8") for r in result["records"]]}


def differences(before: dict, after: dict) -> list[str]:
    out = []
    for name, old in before.items():
        new = after.get(name)
        if new is None:
            out.append(f"{name}: not run")
            continue
        for key in ("losses", "grad_norms", "memory", "comm", "fp8"):
            if old[key] != new[key]:
                out.append(f"{name}: {key} differ: {old[key]} != {new[key]}"[:400])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", default=None, help="a JSON written by an earlier run")
    parser.add_argument("--runs", nargs="+", default=None, choices=[r[0] for r in RUNS])
    args = parser.parse_args(argv)
    data = corpus_args()
    runs = {}
    for name, nproc, flags in RUNS:
        if args.runs is None or name in args.runs:
            runs[name] = record(name, nproc, flags, data)
            print(f"{name:<18} final loss {struct.unpack('>d', bytes.fromhex(runs[name]['losses'][-1]))[0]:.6f}",
                  flush=True)
    save_results(args.out or RESULTS / "reference-runs.json", run_meta("reference_runs.py", argv), runs=runs)
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["runs"]
        diffs = differences({k: v for k, v in before.items() if k in runs}, runs)
        print("\n".join(diffs) if diffs else f"identical to {args.compare}: {len(runs)} runs, {ITERS} iterations each")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
