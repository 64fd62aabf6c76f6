"""Supervised fine-tuning at several precision levels on the built-in instruction set, from the
pretraining demo's checkpoint: response-loss curves, validation loss, exact match on held-out
questions, step time and bytes per parameter, all runs in one invocation.

    python bench/sft.py                          # none, none (another seed), O2, O3, O3 (another seed)
    python bench/sft.py --runs none O3 --iters 300

Each run is `make sft`'s fine-tuning (torchrun, 2 processes, tensor parallel 2 + sequence
parallel, configs/gpt-tiny.yaml, --lr 2e-3 over `--iters` iterations) at one level; "seed 2" runs
change the order of the training samples (the weights start from the same checkpoint), which
shows how much two runs of one level differ by chance. Exact match and response loss come from
tools/sft_eval.py on the first 150 test questions. Builds the pretraining demo's checkpoint
first when runs/pretrain-demo/checkpoints is missing. Prints a table, writes JSON (default
bench/results/sft-cpu.json) and a PNG of the training-loss curves beside it.
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
from bench.train_step import launch  # noqa: E402
from tools.plot_metrics import plot_metrics  # noqa: E402

PRETRAINED = REPO / "runs" / "pretrain-demo" / "checkpoints"
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--device", "cpu"]
RUNS = {"none": ["--fp8-level", "none"], "none-seed2": ["--fp8-level", "none", "--seed", "2"],
        "O2": ["--fp8-level", "O2"], "O3": ["--fp8-level", "O3"], "O3-seed2": ["--fp8-level", "O3", "--seed", "2"]}


def _tool_output(*command: str) -> str:
    return subprocess.run([sys.executable, *command], cwd=REPO, check=True, capture_output=True, text=True).stdout


def evaluate(checkpoint: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        _tool_output("tools/sft_eval.py", "--load", str(checkpoint), "--input", "data/builtin-sft/test.jsonl",
                     "--max-samples", "150", "--device", "cpu", "--out", str(out))
        summary = json.loads(out.read_text())
    return {"exact_match_rate": summary["exact_match_rate"], "response_loss": summary["response_loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", default=str(RESULTS / "sft-cpu.json"))
    args = parser.parse_args(argv)
    if not (PRETRAINED / "latest_checkpointed_iteration.txt").is_file():
        subprocess.run(["make", "pretrain"], cwd=REPO, check=True)
    data = _tool_output("tools/builtin_sft.py", "--print-args", "--quiet").split()
    before = evaluate(PRETRAINED)
    print(f"pretrained checkpoint: exact match {100 * before['exact_match_rate']:.1f}%, "
          f"response loss {before['response_loss']:.4f}")
    print(f"{'run':<11}{'step ms':>9}{'B/param':>9}{'loss (last 50)':>16}{'val loss':>10}{'response loss':>15}"
          f"{'exact match':>13}")
    rows, curves = [], []
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.runs:
            checkpoint = Path(tmp) / label
            flags = [*data, *TP2, *RUNS[label], "--pretrained-checkpoint", str(PRETRAINED), "--lr", "2e-3",
                     "--min-lr", "2e-4", "--eval-interval", "50", "--save", str(checkpoint)]
            result = launch(2, flags, args.iters, label, interval=10, script="finetune_sft.py", warmup=10,
                            eval_iters=4)
            losses = [r["loss"] for r in result["records"]]
            tail = losses[-5:]  # the last 50 iterations, logged every 10
            row = {"run": label, "step_time_s": result["step_time_s"],
                   "state_bytes_per_param": result["memory"]["state_bytes_per_param"],
                   "final_loss_mean_last_50": sum(tail) / len(tail), "validation": result["validation"],
                   **evaluate(checkpoint), "losses": [(r["iteration"], r["loss"]) for r in result["records"]]}
            rows.append(row)
            curve = Path(tmp) / f"{label}.jsonl"
            curve.write_text("".join(json.dumps(r) + "\n" for r in result["records"]))
            curves.append(str(curve))
            print(f"{label:<11}{1000 * row['step_time_s']:>9.1f}{row['state_bytes_per_param']:>9.2f}"
                  f"{row['final_loss_mean_last_50']:>16.4f}{row['validation'][-1][1]:>10.4f}"
                  f"{row['response_loss']:>15.4f}{100 * row['exact_match_rate']:>12.1f}%", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_metrics(curves, str(out.with_suffix(".png")), labels=args.runs)
    base = next((r for r in rows if r["run"] == "none"), None)
    ratios = {r["run"]: {"step_time_vs_none": r["step_time_s"] / base["step_time_s"],
                         "final_loss_vs_none": r["final_loss_mean_last_50"] / base["final_loss_mean_last_50"] - 1}
              for r in rows} if base else {}
    save_results(out, run_meta("sft.py", argv, iters=args.iters, before=before), rows=rows, ratios=ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
