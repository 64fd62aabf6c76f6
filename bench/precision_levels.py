"""The precision levels side by side on one small GPT and the same data: persistent bytes per
parameter, data-parallel and tensor-parallel bytes per step, FP8 ZeRO's balance, step time and
the loss after a fixed number of iterations, on CPU.

    python bench/precision_levels.py [--runs none O1 O2 O3-dp4 ...] [--iters 60]

Runs (label: processes and flags): the levels at DP 2; `none` with the distributed optimizer
(the FP8 ZeRO baseline: FP32 reduce-scatter + all-gather of the weights); O3 at DP 1, 2 and 4;
and tensor parallelism 2 with sequence parallelism for none, O3 with the high-precision
reduce-scatter (`--no-fp8-reduce-scatter`) and O3 as it is (FP8 reduce-scatter). Prints a table, writes JSON (default
bench/results/precision_levels-cpu.json) and a PNG of the loss curves next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from bench.train_step import corpus_args, launch  # noqa: E402
from tools.plot_metrics import plot_metrics  # noqa: E402

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "1024", "--num-attention-heads", "8",
         "--seq-length", "128", "--max-position-embeddings", "128", "--global-batch-size", "16",
         "--micro-batch-size", "4", "--device", "cpu", "--bf16"]
ZERO = ["--use-distributed-optimizer"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
RUNS = {
    "none": (2, ["--fp8-level", "none"]), "O0": (2, ["--fp8-level", "O0"]),
    "O1": (2, ["--fp8-level", "O1"]), "O2": (2, ["--fp8-level", "O2"]),
    "none-zero": (2, ["--fp8-level", "none", *ZERO]), "none-zero-dp4": (4, ["--fp8-level", "none", *ZERO]),
    "O3-dp1": (1, ["--fp8-level", "O3"]), "O3": (2, ["--fp8-level", "O3"]), "O3-dp4": (4, ["--fp8-level", "O3"]),
    "none-tp2": (2, ["--fp8-level", "none", *TP2]),
    "O3-tp2-bf16-rs": (2, ["--fp8-level", "O3", *TP2, "--no-fp8-reduce-scatter"]),
    "O3-tp2": (2, ["--fp8-level", "O3", *TP2]),  # the FP8 reduce-scatter is O3's default
}


def row_of(label: str, nproc: int, result: dict) -> dict:
    memory, comm, fp8 = result["memory"], result["comm"], result["records"][-1].get("fp8") or {}
    return {"run": label, "processes": nproc, "state_bytes_per_param": memory["state_bytes_per_param"],
            "fp8_state_bytes_per_param": memory.get("fp8_state_bytes_per_param"),
            "dp_bytes_per_step": comm["dp_bytes"], "tp_bytes_per_step": comm["tp_bytes"],
            "fp8_weight_dp_bytes": fp8.get("weight_dp_bytes"),
            "owner_bytes_min_max": ([memory["fp8_owner_bytes_min"], memory["fp8_owner_bytes_max"]]
                                    if "fp8_owner_bytes_min" in memory else None),
            "step_time_s": result["step_time_s"], "final_loss": result["final_loss"], "memory": memory,
            "fp8": fp8 or None, "losses": [(r["iteration"], r["loss"]) for r in result["records"]]}


def print_row(row: dict) -> None:
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    balance = row["owner_bytes_min_max"]
    mib = lambda v: v / 2**20 if v is not None else None  # noqa: E731
    print(f"{row['run']:<14} {row['processes']:>2} {row['state_bytes_per_param']:>8.2f} "
          f"{fmt(row['fp8_state_bytes_per_param'], '>8.2f')} {mib(row['dp_bytes_per_step']):>8.2f} "
          f"{fmt(mib(row['fp8_weight_dp_bytes']), '>8.2f')} {mib(row['tp_bytes_per_step']):>8.2f} "
          f"{(f'{balance[0] / 2**20:.2f}/{balance[1] / 2**20:.2f}' if balance else '-'):>11} "
          f"{row['step_time_s'] * 1e3:>8.1f} {row['final_loss']:>8.4f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = corpus_args()
    out = Path(args.out or RESULTS / "precision_levels-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, curves = [], []
    print(f"{'run':<14} {'np':>2} {'B/param':>8} {'fp8 B/p':>8} {'dp MiB':>8} {'fp8w MiB':>8} {'tp MiB':>8} "
          f"{'owner MiB':>11} {'step ms':>8} {'loss':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.runs:
            nproc, flags = RUNS[label]
            result = launch(nproc, MODEL + data + flags, args.iters, label, interval=10)
            curve = Path(tmp) / f"{label}.jsonl"
            curve.write_text("".join(json.dumps(r) + "\n" for r in result["records"]))
            curves.append(str(curve))
            rows.append(row_of(label, nproc, result))
            print_row(rows[-1])
        plot_metrics(curves, str(out.with_suffix(".png")), labels=args.runs)
    save_results(out, run_meta("precision_levels.py", argv), rows=rows, ratios=ratios(rows))
    return 0


def ratios(rows: list[dict]) -> dict:
    """The issue's figures: FP8 ZeRO's weight traffic against BF16/FP32 ZeRO's, and sequence-parallel
    traffic against `none`, where both runs are present."""
    by = {r["run"]: r for r in rows}
    out = {}
    for o3, base in (("O3", "none-zero"), ("O3-dp4", "none-zero-dp4")):
        if o3 in by and base in by:
            dense = by[o3]["dp_bytes_per_step"] - by[o3]["fp8_weight_dp_bytes"]  # moves alike in both runs
            out[f"{o3}_fp8_weight_traffic_vs_{base}"] = (by[o3]["fp8_weight_dp_bytes"]
                                                         / (by[base]["dp_bytes_per_step"] - dense))
            out[f"{o3}_dp_traffic_vs_{base}"] = by[o3]["dp_bytes_per_step"] / by[base]["dp_bytes_per_step"]
    for o3 in ("O3-tp2-bf16-rs", "O3-tp2"):
        if o3 in by and "none-tp2" in by:
            out[f"{o3}_tp_traffic_vs_none-tp2"] = by[o3]["tp_bytes_per_step"] / by["none-tp2"]["tp_bytes_per_step"]
    for key, value in out.items():
        print(f"{key}: {value:.3f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
