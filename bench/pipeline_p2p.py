"""FP8 pipeline sends (`--fp8-pipeline-p2p`) against higher-precision sends: the training loss
and the pipeline bytes of the tiny GPT at pipeline size 2 on CPU, on the same data.

    python bench/pipeline_p2p.py [--iters 300] [--seeds 1234 4321]

Each run is one `torchrun` launch of pretrain_gpt.py with 2 processes (one per stage) at LR 1e-3.
Single batches are noisy, so the figure compared is the mean training loss of the last 50
iterations, compared on the same seed (initialisation and data order): a second seed changes
which batches fall in the last 50 and so moves that mean by far more than precision does. Prints a table and writes JSON (default bench/results/pipeline_p2p-cpu.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, run_meta, save_results
from bench.train_step import corpus_args, launch

MODEL = ["--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--device", "cpu",
         "--pipeline-model-parallel-size", "2"]
# (name, flags): each level's sends in FP32 (no --bf16) and the same level with FP8 sends.
VARIANTS = [("none", ["--fp8-level", "none"]),
            ("O2", ["--fp8-level", "O2", "--no-fp8-pipeline-p2p"]),
            ("O2+fp8-p2p", ["--fp8-level", "O2", "--fp8-pipeline-p2p"]),
            ("O3", ["--fp8-level", "O3", "--no-fp8-pipeline-p2p"]),
            ("O3+fp8-p2p", ["--fp8-level", "O3", "--fp8-pipeline-p2p"])]
LEVELS = ("O2", "O3")
TAIL = 50
HIDDEN = 128  # configs/gpt-tiny.yaml
# What stage 0 (rank 0, whose metrics are logged) sends per step without FP8: one FP32 activation
# per micro-batch. Its pp bytes also hold the tied-embedding gradient all-reduce, the same in every
# variant, which `summarize` takes out to compare the sends alone.
FP32_SENDS_PER_STEP = 64 * 2 * HIDDEN * 4 * (8 // 2)


def run_variant(name: str, flags: list[str], seed: int, iters: int, data: list[str], model: list[str] = MODEL,
                group: str = "pp") -> dict:
    """One 2-process run; the last-50 mean loss and the bytes per step over `group`."""
    result = launch(2, model + data + flags + ["--seed", str(seed)], iters, f"{name}/seed{seed}", interval=1)
    records = result["records"]
    tail = records[-TAIL:]
    return {"variant": name, "seed": seed, "tail_mean_loss": sum(r["loss"] for r in tail) / len(tail),
            "final_loss": result["final_loss"], f"{group}_bytes_per_step": records[-1]["comm"][f"{group}_bytes"],
            "skipped": sum(bool(r["skipped"]) for r in records), "step_time_s": result["step_time_s"],
            "losses": [r["loss"] for r in records]}


def summarize(rows: list[dict]) -> dict:
    """Relative differences of the last-50 means on the same seed (same initialisation and data):
    FP8 sends vs not, and each level vs none, the spread that precision alone already causes."""
    by = {(r["variant"], r["seed"]): r["tail_mean_loss"] for r in rows}
    out = {}
    for seed in sorted({r["seed"] for r in rows}):
        for level in LEVELS:
            if (level, seed) in by and (f"{level}+fp8-p2p", seed) in by:
                out[f"fp8_p2p_vs_{level}_seed{seed}"] = by[(f"{level}+fp8-p2p", seed)] / by[(level, seed)] - 1
            if (level, seed) in by and ("none", seed) in by:
                out[f"{level}_vs_none_seed{seed}"] = by[(level, seed)] / by[("none", seed)] - 1
    pp = {r["variant"]: r["pp_bytes_per_step"] for r in rows}
    if "none" in pp and "O2+fp8-p2p" in pp:
        embedding_sync = pp["none"] - FP32_SENDS_PER_STEP
        out["embedding_sync_bytes_per_step"] = embedding_sync
        out["send_bytes_per_step_fp32"] = FP32_SENDS_PER_STEP
        out["send_bytes_per_step_fp8"] = pp["O2+fp8-p2p"] - embedding_sync
        out["send_bytes_fp8_over_fp32"] = out["send_bytes_per_step_fp8"] / FP32_SENDS_PER_STEP
        out["pp_bytes_fp8_over_fp32"] = pp["O2+fp8-p2p"] / pp["none"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 4321])
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS],
                        choices=[v[0] for v in VARIANTS])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = corpus_args()
    rows = []
    print(f"{'variant':<11} {'seed':>5} {f'last-{TAIL} loss':>13} {'pp KB/step':>10} {'skipped':>7} {'step ms':>8}")
    for seed in args.seeds:
        for name, flags in VARIANTS:
            if name not in args.variants:
                continue
            row = run_variant(name, flags, seed, args.iters, data)
            rows.append(row)
            print(f"{name:<11} {seed:>5} {row['tail_mean_loss']:>13.4f} {row['pp_bytes_per_step'] / 1024:>10.1f} "
                  f"{row['skipped']:>7} {row['step_time_s'] * 1e3:>8.1f}", flush=True)
    summary = summarize(rows)
    for key, value in summary.items():
        print(f"{key}: {value:+.4%}" if "bytes" not in key else f"{key}: {value:.4f}".replace(".0000", ""))
    save_results(args.out or RESULTS / "pipeline_p2p-cpu.json", run_meta("pipeline_p2p.py", argv),
                 summary=summary, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
