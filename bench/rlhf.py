"""RLHF memory as the FP8-LM paper reports it: the bytes of weights, gradients, master weights and
optimizer states of all four PPO models together (actor and critic trained; reference and reward
model frozen), at BF16 and at FP8 levels, against the paper's -32% (weights) and -62% (optimizer
states); and the step time of each, all runs in one invocation.

    python bench/rlhf.py                      # bf16 (none), O2, O3; 3 PPO iterations each
    python bench/rlhf.py --levels bf16 O3 --hidden-size 1024

The model (default 4 layers, hidden 512, FFN 2048, vocabulary 1024: linears hold 94% of its
parameters, as in the paper's large models) starts from a random GPT saved here (the SFT model's
stand-in) and a reward model trained for one step from it; the runs are rlhf/train_ppo.py in one
process with --bf16, the trained models at the level and the frozen ones at the level's weight
format (`--reference-fp8-level` / `--reward-model-fp8-level`: O3 holds them in FP8, one byte per
weight; below O3 they are BF16). The figures are the metrics record's `memory` (this process's
persistent bytes, scales included) plus `rlhf.frozen_memory`. Prints a table, writes JSON
(default bench/results/rlhf-cpu.json).
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

LEVELS = {"bf16": "none", "O1": "O1", "O2": "O2", "O3": "O3"}
PAPER = {"weights": -0.32, "optimizer_states": -0.62}


def model_flags(args) -> list[str]:
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--ffn-hidden-size", str(4 * args.hidden_size), "--num-attention-heads", str(args.hidden_size // 64),
            "--seq-length", "64", "--max-position-embeddings", "64", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(args.vocab_size - 1), "--make-vocab-size-divisible-by", "128",
            "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--fp8-min-features", "128", "--device", "cpu",
            "--num-workers", "0", "--bf16"]


def _run(script: str, argv: list[str], label: str) -> None:
    proc = subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")


def save_random_gpt(folder: Path, flags: list[str]) -> None:
    """A randomly initialised GPT saved as a training run saves it (the SFT checkpoint's stand-in)."""
    from megatron.core.parallel_state import ParallelState
    from megatron.core.tensor_parallel.random import model_parallel_seed
    from megatron.core.tokenizers.tokenizer import build_tokenizer
    from megatron.training.config import parse_config
    from megatron.training.gpt_providers import gpt_task
    from megatron.training.resume import Checkpointer, layout_of
    from megatron.training.training import TrainState

    ps = ParallelState.single("cpu")
    config = parse_config(flags + ["--save", str(folder), "--train-iters", "1", "--lr", "1e-5", "--micro-batch-size", "1",
                                   "--global-batch-size", "1"]).for_world(1)
    task = gpt_task(config, ps, build_tokenizer(config.tokenizer.tokenizer_config()).vocab_size, eod_id=None)
    rng = model_parallel_seed(ps, config.seed)
    model = task.model_provider(config, ps, rng)
    Checkpointer(config, ps, model, None, rng, train_state=TrainState(iteration=1), components={},
                 layout=layout_of(ps, False), global_name=task.global_name, signature=task.model_signature).save()


def write_data(folder: Path, vocab: int) -> tuple[Path, Path]:
    prompts, pairs = folder / "prompts.jsonl", folder / "pairs.jsonl"
    with open(prompts, "w") as p, open(pairs, "w") as q:
        for i in range(64):
            prompt = " ".join(str((i * 37 + 11 * k) % (vocab - 1)) for k in range(8))
            p.write(json.dumps({"prompt": prompt}) + "\n")
            q.write(json.dumps({"prompt": prompt, "chosen": str(i % 50), "rejected": str(50 + i % 50)}) + "\n")
    return prompts, pairs


def totals(record: dict) -> dict:
    memory, frozen = record["memory"], record["rlhf"]["frozen_memory"]
    frozen_weights = sum(frozen.values())
    return {"weights": memory["weight_bytes"] + frozen_weights, "trained_weights": memory["weight_bytes"],
            "frozen_weights": frozen_weights, "gradients": memory["grad_bytes"], "masters": memory["master_bytes"],
            "optimizer_moments": memory["optim_bytes"],
            "optimizer_states": memory["master_bytes"] + memory["optim_bytes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", default=["bf16", "O2", "O3"], choices=list(LEVELS))
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "rlhf-cpu.json"))
    args = parser.parse_args(argv)
    flags = model_flags(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_random_gpt(tmp / "sft", flags)
        prompts, pairs = write_data(tmp, args.vocab_size)
        _run("rlhf/train_reward_model.py", flags + ["--pretrained-checkpoint", str(tmp / "sft"), "--data-path",
                                                    str(pairs), "--train-iters", "1", "--micro-batch-size", "4",
                                                    "--global-batch-size", "4", "--lr", "1e-5", "--lr-warmup-iters",
                                                    "0", "--eval-iters", "0", "--save", str(tmp / "rm")], "reward model")
        print(f"{'level':<7}{'weights MB':>11}{'(trained':>10}{'frozen)':>9}{'grads MB':>10}{'optim MB':>10}"
              f"{'(masters':>10}{'moments)':>10}{'step s':>8}")
        for label in args.levels:
            level = LEVELS[label]
            frozen_level = "O3" if level == "O3" else "none"
            metrics = tmp / f"{label}.jsonl"
            _run("rlhf/train_ppo.py", flags + [
                "--pretrained-checkpoint", str(tmp / "sft"), "--reward-model", str(tmp / "rm"),
                "--data-path", str(prompts), "--rollout-prompts", "8", "--group-size", "1", "--max-new-tokens", "16",
                "--micro-batch-size", "4", "--global-batch-size", "8", "--ppo-epochs", "1", "--lr", "1e-5",
                "--lr-warmup-iters", "0", "--train-iters", str(args.iters), "--log-interval", "1",
                "--fp8-level", level, "--reference-fp8-level", frozen_level, "--reward-model-fp8-level", frozen_level,
                "--metrics-file", str(metrics)], label)
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            steady = records[1:] or records
            row = {"level": label, **totals(records[-1]), "num_params": records[-1]["memory"]["num_params"],
                   "step_time_s": sum(r["step_time_s"] for r in steady) / len(steady)}
            rows.append(row)
            mb = 1 / 2**20
            print(f"{label:<7}{row['weights'] * mb:>11.1f}{row['trained_weights'] * mb:>10.1f}"
                  f"{row['frozen_weights'] * mb:>9.1f}{row['gradients'] * mb:>10.1f}"
                  f"{row['optimizer_states'] * mb:>10.1f}{row['masters'] * mb:>10.1f}"
                  f"{row['optimizer_moments'] * mb:>10.1f}{row['step_time_s']:>8.2f}", flush=True)
    base = next((r for r in rows if r["level"] == "bf16"), None)
    changes = {}
    if base:
        for row in rows:
            changes[row["level"]] = {key: row[key] / base[key] - 1 for key in
                                     ("weights", "gradients", "optimizer_states", "step_time_s")}
        print("\nchange vs bf16 (paper, PPO: weights -32%, optimizer states -62%)")
        for level, change in changes.items():
            print(f"{level:<7}" + "  ".join(f"{k} {100 * v:+.1f}%" for k, v in change.items()))
    save_results(args.out, run_meta("rlhf.py", argv, model={k: getattr(args, k) for k in
                                                             ("num_layers", "hidden_size", "vocab_size")}),
                 rows=rows, change_vs_bf16=changes, paper=PAPER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
