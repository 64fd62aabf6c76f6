#!/usr/bin/env python
"""The RLHF demo's results (`make rlhf`) in one table and one JSON file.

    python tools/rlhf_summary.py runs/rlhf-demo

Reads what the demo wrote in the folder: eval-sft.json (the SFT model's sampled exact match on the
held-out module questions), per GRPO level grpo-LEVEL/metrics.jsonl (the reward per iteration) and
eval-grpo-LEVEL.json, and eval-dpo-O3.json (DPO's held-out pairs). Prints the table and writes
summary.json beside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import OneLineErrorParser, run_cli  # noqa: E402

WINDOW = 10  # iterations averaged at the start and the end of a run's reward curve


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}; run make rlhf first") from None


def grpo_rewards(path: Path) -> list[float]:
    rewards = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rewards.append(float(json.loads(line)["rlhf"]["reward"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:{number}: not an RLHF metrics record (no rlhf.reward)") from None
    if not rewards:
        raise ValueError(f"{path} holds no records; run make rlhf first")
    return rewards


def summarize(folder: Path) -> dict:
    sft = _read_json(folder / "eval-sft.json")
    summary = {"sft_sampled_exact_match": sft["exact_match_rate"], "grpo": {}, "dpo": None}
    for metrics in sorted(folder.glob("grpo-*/metrics.jsonl")):
        level = metrics.parent.name[len("grpo-"):]
        rewards = grpo_rewards(metrics)
        window = min(WINDOW, len(rewards))
        after = _read_json(folder / f"eval-grpo-{level}.json")
        summary["grpo"][level] = {"iterations": len(rewards), "reward_first": sum(rewards[:window]) / window,
                                  "reward_last": sum(rewards[-window:]) / window,
                                  "heldout_sampled_exact_match": after["exact_match_rate"],
                                  "heldout_samples": after["samples"]}
    dpo = folder / "eval-dpo-O3.json"
    if dpo.is_file():
        summary["dpo"] = _read_json(dpo)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the demo's folder (make rlhf: runs/rlhf-demo)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    summary = summarize(folder)
    print(f"held-out module questions, sampled exact match (T 0.7): SFT model "
          f"{100 * summary['sft_sampled_exact_match']:.1f}%")
    for level, row in summary["grpo"].items():
        print(f"GRPO {level:<5} {row['iterations']} iterations: reward {row['reward_first']:.3f} (first {WINDOW}) -> "
              f"{row['reward_last']:.3f} (last {WINDOW}); held out {100 * row['heldout_sampled_exact_match']:.1f}%")
    if summary["dpo"]:
        d = summary["dpo"]
        print(f"DPO O3: held-out pairs {d['pairs']}: reward accuracy {100 * d['accuracy']:.1f}%, loss {d['dpo_loss']:.3f} "
              f"(0.693 at the start); policy prefers the chosen answer in {100 * d['policy_prefers_chosen']:.1f}% "
              f"(the SFT model: {100 * d['reference_prefers_chosen']:.1f}%)")
    out = folder / "summary.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"> wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
