"""Training step time and tokens/s of the real training loop (pretrain_gpt.py), for each
precision level at a few model sizes and tensor-parallel sizes, on the built-in corpus.

    python bench/train_step.py [--levels none O0] [--sizes tiny small] [--tp 1 2] [--iters 15]
    python bench/train_step.py --levels none O0 O3 --sizes small --tp 1 --dp 2 --overlap both

Each combination is one `torchrun` launch (`--nproc-per-node` = TP x DP); the figures are the
means of the logged intervals after the first (which holds start-up). `--overlap both` runs each
level with and without `--overlap-grad-reduce` (and `--overlap-param-gather` at O3, whose weights
are sharded; buckets of `--bucket-size` parameters, so that a small model has several). Each row also gives its step time over `none`'s in the same layout and
overlap mode. Prints a table and writes JSON (default bench/results/train_step-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
SIZES = {
    "tiny": [],  # configs/gpt-tiny.yaml as it is: 2 layers, hidden 128, seq 128
    "small": ["--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "1024",
              "--num-attention-heads", "8", "--seq-length", "256", "--max-position-embeddings", "256"],
}


def corpus_args() -> list[str]:
    out = subprocess.run([sys.executable, "tools/builtin_corpus.py", "--print-args", "--quiet"], cwd=REPO,
                         check=True, capture_output=True, text=True)
    return out.stdout.split()


def launch(nproc: int, flags: list[str], iters: int, label: str, interval: int | None = None, *,
           script: str = "pretrain_gpt.py", warmup: int = 2, eval_iters: int = 0) -> dict:
    """One `torchrun` run of `script` (pretrain_gpt.py, finetune_sft.py) on the tiny config plus
    `flags`; the mean step time of the logged intervals after the first, the last record's
    figures, and all records (validation records included when `eval_iters`)."""
    interval = interval or max(1, iters // 3)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   script, "--config", "configs/gpt-tiny.yaml", *flags, "--train-iters", str(iters),
                   "--lr-warmup-iters", str(warmup), "--log-interval", str(interval), "--eval-iters", str(eval_iters),
                   "--metrics-file", str(metrics)]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{proc.stderr[-2000:]}")
        everything = [json.loads(line) for line in metrics.read_text().splitlines()]
    records = [r for r in everything if "loss" in r]
    steady = records[1:] or records
    step = sum(r["step_time_s"] for r in steady) / len(steady)
    last = records[-1]
    return {"step_time_s": step, "tokens_per_s": last["tokens_per_s"] * last["step_time_s"] / step,
            "final_loss": last["loss"], "memory": last["memory"], "comm": last["comm"], "records": records,
            "validation": [(r["iteration"], r["val_loss"]) for r in everything if "val_loss" in r]}


def run_one(size: str, level: str, tp: int, iters: int, device: str, data: list[str], *, dp: int = 1,
            overlap: bool = False, bucket_size: int | None = None) -> dict:
    flags = [*SIZES[size], *data, "--fp8-level", level, "--tensor-model-parallel-size", str(tp),
             "--device", device] + (["--sequence-parallel"] if tp > 1 else [])
    # Overlap: gradient reduction, and where the weights are sharded (O3 at DP > 1) their all-gathers.
    flags += (["--overlap-grad-reduce"] + (["--overlap-param-gather"] if level == "O3" and dp > 1 else [])
              if overlap else [])
    flags += ["--ddp-bucket-size", str(bucket_size)] if bucket_size else []
    result = launch(tp * dp, flags, iters, f"{size}/{level}/tp{tp}/dp{dp}{'/overlap' if overlap else ''}")
    return {"size": size, "level": level, "tp": tp, "dp": dp, "overlap": overlap, "step_time_s": result["step_time_s"],
            "tokens_per_s": result["tokens_per_s"], "final_loss": result["final_loss"],
            "state_bytes_per_param": result["memory"]["state_bytes_per_param"],
            "tp_bytes_per_step": result["comm"]["tp_bytes"], "dp_bytes_per_step": result["comm"]["dp_bytes"],
            "num_params": result["memory"]["num_params"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", default=["none", "O0"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dp", type=int, nargs="+", default=[1], help="data-parallel sizes")
    parser.add_argument("--overlap", choices=("off", "on", "both"), default="off",
                        help="--overlap-grad-reduce off, on, or each level both ways")
    parser.add_argument("--bucket-size", type=int, default=None,
                        help="--ddp-bucket-size for the runs (default: the trainer's 40 MB buckets)")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = corpus_args()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.overlap]
    rows = []
    print(f"{'size':<6} {'level':<5} {'tp':>2} {'dp':>2} {'overlap':>7} {'step ms':>9} {'vs none':>7} "
          f"{'tokens/s':>9} {'bytes/param':>11} {'loss':>7}")
    for size in args.sizes:
        for tp in args.tp:
            for dp in args.dp:
                for level in args.levels:
                    for overlap in modes:
                        row = run_one(size, level, tp, args.iters, args.device, data, dp=dp, overlap=overlap,
                                      bucket_size=args.bucket_size)
                        base = next((r for r in rows if (r["size"], r["tp"], r["dp"], r["overlap"], r["level"])
                                     == (size, tp, dp, overlap, "none")), None)
                        row["vs_none"] = row["step_time_s"] / base["step_time_s"] if base else None
                        rows.append(row)
                        ratio = f"{row['vs_none']:.2f}" if row["vs_none"] is not None else "-"
                        print(f"{size:<6} {level:<5} {tp:>2} {dp:>2} {'on' if overlap else 'off':>7} "
                              f"{row['step_time_s'] * 1e3:>9.1f} {ratio:>7} {row['tokens_per_s']:>9.0f} "
                              f"{row['state_bytes_per_param']:>11.2f} {row['final_loss']:>7.3f}", flush=True)
    save_results(args.out or RESULTS / f"train_step-{args.device}.json", run_meta("train_step.py", argv), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
