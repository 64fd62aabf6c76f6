"""The precision levels side by side on one small GPT and the same data: persistent bytes per
parameter, data-parallel bytes per step, step time and the loss after a fixed number of
iterations, at data-parallel size 2 on CPU.

    python bench/precision_levels.py [--levels none O0 O1 O2] [--iters 60]

Prints a table, writes JSON (default bench/results/precision_levels-cpu.json) and a PNG of the
loss curves next to it.
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
         "--micro-batch-size", "4", "--device", "cpu"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", default=["none", "O0", "O1", "O2"])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = corpus_args()
    out = Path(args.out or RESULTS / "precision_levels-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, curves = [], []
    print(f"{'level':<6} {'bytes/param':>11} {'dp MB/step':>10} {'step ms':>9} {'final loss':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.levels:
            result = launch(2, MODEL + data + ["--fp8-level", level], args.iters, level, interval=10)
            curve = Path(tmp) / f"{level}.jsonl"
            curve.write_text("".join(json.dumps(r) + "\n" for r in result["records"]))
            curves.append(str(curve))
            row = {"level": level, "state_bytes_per_param": result["memory"]["state_bytes_per_param"],
                   "dp_bytes_per_step": result["comm"]["dp_bytes"], "step_time_s": result["step_time_s"],
                   "final_loss": result["final_loss"], "memory": result["memory"],
                   "fp8": result["records"][-1].get("fp8"),
                   "losses": [(r["iteration"], r["loss"]) for r in result["records"]]}
            rows.append(row)
            print(f"{level:<6} {row['state_bytes_per_param']:>11.2f} {row['dp_bytes_per_step'] / 2**20:>10.2f} "
                  f"{row['step_time_s'] * 1e3:>9.1f} {row['final_loss']:>10.4f}", flush=True)
        plot_metrics(curves, str(out.with_suffix(".png")), labels=args.levels)
    save_results(out, run_meta("precision_levels.py", argv), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
