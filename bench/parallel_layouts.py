"""Step time and per-rank persistent memory of a small GPT across parallel layouts (TP / PP / DP,
distributed optimizer on and off), on CPU, through the real training loop.

    python bench/parallel_layouts.py [--iters 12] [--out FILE.json]

Prints a table and writes JSON (default bench/results/parallel_layouts-cpu.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from bench.train_step import corpus_args, launch  # noqa: E402

SMALL = ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "1024", "--num-attention-heads", "8",
         "--seq-length", "256", "--max-position-embeddings", "256", "--global-batch-size", "16",
         "--micro-batch-size", "2"]
# (name, processes, flags)
LAYOUTS = [
    ("tp1 pp1 dp1", 1, []),
    ("dp2", 2, []),
    ("dp2 + distributed optimizer", 2, ["--use-distributed-optimizer"]),
    ("tp2 + sp", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("pp2 (1F1B)", 2, ["--pipeline-model-parallel-size", "2"]),
    ("pp2 interleaved (2 chunks)", 2, ["--pipeline-model-parallel-size", "2",
                                       "--num-layers-per-virtual-pipeline-stage", "1"]),
    ("dp4 + distributed optimizer", 4, ["--use-distributed-optimizer"]),
    ("tp2 pp2", 4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                    "--pipeline-model-parallel-size", "2"]),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--only", nargs="+", default=None, help="run only these layouts (by name)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = corpus_args()
    rows = []
    print(f"{'layout':<30} {'procs':>5} {'step ms':>9} {'tokens/s':>9} {'MB/rank':>8} {'bytes/param':>11} {'loss':>7}")
    for name, procs, flags in LAYOUTS:
        if args.only and name not in args.only:
            continue
        result = launch(procs, SMALL + data + flags + ["--device", "cpu"], args.iters, name)
        memory = result["memory"]
        held = memory["weight_bytes"] + memory["grad_bytes"] + memory["master_bytes"] + memory["optim_bytes"]
        row = {"layout": name, "processes": procs, "step_time_s": result["step_time_s"],
               "tokens_per_s": result["tokens_per_s"], "rank0_persistent_bytes": held,
               "state_bytes_per_param": memory["state_bytes_per_param"], "final_loss": result["final_loss"],
               "comm": result["comm"], "memory": memory}
        rows.append(row)
        print(f"{name:<30} {procs:>5} {row['step_time_s'] * 1e3:>9.1f} {row['tokens_per_s']:>9.0f} "
              f"{held / 2**20:>8.2f} {row['state_bytes_per_param']:>11.2f} {row['final_loss']:>7.3f}", flush=True)
    save_results(args.out or RESULTS / "parallel_layouts-cpu.json", run_meta("parallel_layouts.py", argv), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
