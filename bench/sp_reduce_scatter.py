"""The FP8 sequence-parallel reduce-scatter of input gradients (`--fp8-reduce-scatter`) against
the BF16/FP32 one at level O3: the training loss and the tensor-parallel bytes of the tiny GPT at
TP 2 + sequence parallel on CPU, on the same data, with `none` for the spread precision alone
already causes.

    python bench/sp_reduce_scatter.py [--iters 300] [--seeds 1234 4321]

Each run is one `torchrun` launch of pretrain_gpt.py with 2 processes at LR 1e-3 (FP32 parameters,
so the high-precision reduce-scatter is FP32). As in bench/pipeline_p2p.py, the figure compared is
the mean training loss of the last 50 iterations on the same seed. Prints a table and writes JSON
(default bench/results/sp_reduce_scatter-cpu.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, run_meta, save_results
from bench.pipeline_p2p import TAIL, run_variant
from bench.train_step import corpus_args

MODEL = ["--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "4",
         "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--device", "cpu",
         "--tensor-model-parallel-size", "2", "--sequence-parallel"]
VARIANTS = [("none", ["--fp8-level", "none"]),
            ("O3", ["--fp8-level", "O3", "--no-fp8-reduce-scatter"]),
            ("O3+fp8-rs", ["--fp8-level", "O3", "--fp8-reduce-scatter"])]


def summarize(rows: list[dict]) -> dict:
    by = {(r["variant"], r["seed"]): r for r in rows}
    out = {}
    for seed in sorted({r["seed"] for r in rows}):
        pairs = (("fp8_rs_vs_O3", "O3+fp8-rs", "O3"), ("O3_vs_none", "O3", "none"), ("fp8_rs_vs_none", "O3+fp8-rs", "none"))
        for key, a, b in pairs:
            if (a, seed) in by and (b, seed) in by:
                out[f"{key}_seed{seed}"] = by[(a, seed)]["tail_mean_loss"] / by[(b, seed)]["tail_mean_loss"] - 1
        if ("O3+fp8-rs", seed) in by and ("O3", seed) in by and ("none", seed) in by:
            tp = {name: by[(name, seed)]["tp_bytes_per_step"] for name in ("none", "O3", "O3+fp8-rs")}
            out["tp_bytes_O3_over_none"] = tp["O3"] / tp["none"]
            out["tp_bytes_fp8_rs_over_none"] = tp["O3+fp8-rs"] / tp["none"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 4321])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = corpus_args()
    rows = []
    print(f"{'variant':<10} {'seed':>5} {f'last-{TAIL} loss':>13} {'tp KB/step':>10} {'skipped':>7} {'step ms':>8}")
    for seed in args.seeds:
        for name, flags in VARIANTS:
            row = run_variant(name, flags, seed, args.iters, data, model=MODEL, group="tp")
            rows.append(row)
            print(f"{name:<10} {seed:>5} {row['tail_mean_loss']:>13.4f} {row['tp_bytes_per_step'] / 1024:>10.1f} "
                  f"{row['skipped']:>7} {row['step_time_s'] * 1e3:>8.1f}", flush=True)
    summary = summarize(rows)
    for key, value in summary.items():
        print(f"{key}: {value:+.4%}" if "bytes" not in key else f"{key}: {value:.4f}")
    save_results(args.out or RESULTS / "sp_reduce_scatter-cpu.json", run_meta("sp_reduce_scatter.py", argv),
                 summary=summary, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
