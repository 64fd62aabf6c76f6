"""FP8 ZeRO's balance at the paper's scales: the greedy whole-tensor partition (Algorithm 1,
`fp8.greedy_partition`) of one pipeline stage's tensor-parallel shards of the transformer linear
weights over the data-parallel ranks, in the layouts of the paper's Table 5 (7B: TP 1 PP 1 DP 32;
13B: TP 2 DP 16; 175B: TP 8 PP 4 DP 4). Reports the master + Adam bytes (FP16 master 2, FP8 m 1,
FP16 v 2 per element, 12 bytes of scales per tensor) of the least and most loaded rank; no
training, it takes a second.

    python bench/zero_balance.py

Prints a table and writes JSON (default bench/results/zero_balance.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from fp8.zero import greedy_partition, rank_loads  # noqa: E402
from megatron.core.distributed.fp8_zero import OWNER_BYTES_PER_ELEMENT, OWNER_SCALE_BYTES  # noqa: E402

# name: (hidden, layers, tp, pp, dp), PAPER-FACTS.md Table 1 / Table 5; the paper's Table 8 min / max GB
MODELS = {"7B": (4096, 32, 1, 1, 32, (49.06, 49.36)), "13B": (5120, 40, 2, 1, 16, (48.45, 48.85)),
          "175B": (12288, 96, 8, 4, 4, (38.64, 40.28))}


def stage_shard_sizes(hidden: int, layers: int, tp: int, pp: int) -> list[int]:
    """Elements of each FP8 weight one rank holds: QKV, output projection, FC1, FC2 per layer."""
    per_layer = [3 * hidden * hidden // tp, hidden * hidden // tp, 4 * hidden * hidden // tp, 4 * hidden * hidden // tp]
    return per_layer * (layers // pp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':<6} {'tp,pp,dp':>9} {'tensors':>8} {'min GB':>8} {'max GB':>8} {'max/min':>8} {'paper max/min':>14}")
    for name, (hidden, layers, tp, pp, dp, paper) in MODELS.items():
        sizes = stage_shard_sizes(hidden, layers, tp, pp)
        owners = greedy_partition(sizes, dp)
        loads = [OWNER_BYTES_PER_ELEMENT * n + OWNER_SCALE_BYTES * count
                 for n, count in zip(rank_loads(sizes, owners, dp), [owners.count(r) for r in range(dp)])]
        row = {"model": name, "tp": tp, "pp": pp, "dp": dp, "tensors": len(sizes), "min_bytes": min(loads),
               "max_bytes": max(loads), "max_over_min": max(loads) / min(loads),
               "paper_table8_gb": paper, "paper_max_over_min": paper[1] / paper[0]}
        rows.append(row)
        print(f"{name:<6} {f'{tp},{pp},{dp}':>9} {len(sizes):>8} {min(loads) / 1e9:>8.3f} {max(loads) / 1e9:>8.3f} "
              f"{row['max_over_min']:>8.4f} {row['paper_max_over_min']:>14.4f}")
    save_results(args.out or RESULTS / "zero_balance.json", run_meta("zero_balance.py", argv), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
