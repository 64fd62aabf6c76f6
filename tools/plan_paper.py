"""`tools/plan.py --paper`: the FP8-LM paper's Table 5 (H100 80 GB) beside the plan of the same
models at the same layouts - memory per GPU and weight-related (data-parallel) traffic per GPU and
iteration - and why they differ."""

from __future__ import annotations

from pathlib import Path

from tools.plan import GB, make_plan

# FP8-LM Table 5 (H100 80 GB): layout, micro-batch, (memory per GPU GB, weight-related traffic GB) per column.
PAPER = {"7B": dict(config="gpt-7b.yaml", tp=1, pp=1, dp=32, mbs=2, none=(69.6, 37.2), O0=(77.3, 37.2),
                   O3=(49.4, 13.9)),
         "13B": dict(config="gpt-13b.yaml", tp=2, pp=1, dp=16, mbs=2, none=(68.2, 34.3), O0=(76.4, 34.3),
                     O3=(48.9, 12.4)),
         "175B": dict(config="gpt-175b.yaml", tp=8, pp=4, dp=4, mbs=1, none=(66.1, 23.4), O0=(69.6, 23.4),
                      O3=(40.3, 8.2))}
PAPER_COLUMNS = {"none": "BF16", "O0": "FP8 Transformer Engine", "O3": "FP8-LM"}


def paper_rows() -> list[dict]:
    """Table 5's models at the paper's layouts: BF16 (none), Transformer Engine (O0), FP8-LM (O3)."""
    rows = []
    for name, paper in PAPER.items():
        argv = ["--config", str(Path(__file__).resolve().parent.parent / "configs" / paper["config"]),
                "--micro-batch-size", str(paper["mbs"]), "--tensor-model-parallel-size", str(paper["tp"]),
                "--pipeline-model-parallel-size", str(paper["pp"])]
        for level in ("none", "O0", "O3"):
            plan = make_plan(argv, paper["dp"], level)
            rows.append({"model": name, "level": level, "paper_memory_gb": paper[level][0],
                         "paper_weight_traffic_gb": paper[level][1], "memory_gb": plan["max_total_bytes"] / GB,
                         "weight_traffic_gb": plan["max_dp_bytes"] / GB, "plan": plan})
    return rows


PAPER_NOTES = """\
Memory: the plan counts states and activations (flash attention, no dropout, as the configs) on
the most loaded GPU. The paper measured its peak, which also holds the allocator's cache, CUDA /
NCCL / cuBLAS workspaces and communication buffers: 6-10 GB in the BF16 rows. Transformer Engine
caches FP8 weight copies beside the BF16 ones (more than BF16 in the paper); O0 here casts weights
where they are used. The FP8-LM saving is larger here (-48 to -55% vs -28 to -39%): the FP8
linears' gradients take 1 byte here against a 4-byte FP32 buffer in BF16 (16-19 GB of it), and
the paper does not itemize what its implementation (MS-AMP, Megatron-LM) holds beside them.
Traffic: bytes one GPU sends per iteration under the ring model ((n-1)/n of each reduce-scatter
or all-gather), 10^9 bytes, embeddings and scales included. The paper's BF16 figures are 4-5%
below 6 bytes x parameters per GPU x (n-1)/n. The FP8-LM ones are 1-20% above the paper's, most
at small DP: FP8 ZeRO here publishes a bucket of one owner's whole tensors by a broadcast, in
which a GPU forwards all of it (an all-gather of balanced pieces sends (n-1)/n), and where the
direct reduction to owners would take more rounds than two per bucket (13B) it sums in the
all-reduce's rounds and hands the sums on, 1/n of the bytes more, to bound the collectives."""


def format_paper(rows: list[dict]) -> str:
    lines = ["FP8-LM Table 5 (H100 80 GB) beside the plan: memory per GPU and weight-related (data-parallel) "
             "traffic per GPU and iteration, GB",
             f"{'model':<6}{'TP,PP,DP':>10}{'uBS':>5}  {'':<28}{'memory: paper':>14}{'plan':>8}{'diff':>8}"
             f"{'traffic: paper':>16}{'plan':>8}{'diff':>8}"]
    for row in rows:
        paper, lay = PAPER[row["model"]], row["plan"]["layout"]
        label, shape = f"{PAPER_COLUMNS[row['level']]} ({row['level']})", f"{lay['tp']},{lay['pp']},{lay['dp']}"
        traffic = 100 * (row["weight_traffic_gb"] / row["paper_weight_traffic_gb"] - 1)
        lines.append(f"{row['model']:<6}{shape:>10}{paper['mbs']:>5}  {label:<28}{row['paper_memory_gb']:>14.1f}"
                     f"{row['memory_gb']:>8.1f}{row['memory_gb'] - row['paper_memory_gb']:>+8.1f}"
                     f"{row['paper_weight_traffic_gb']:>16.1f}{row['weight_traffic_gb']:>8.1f}{traffic:>+7.0f}%")
    lines.append("FP8-LM (O3) against BF16 (none), paper / plan:")
    base = {row["model"]: row for row in rows if row["level"] == "none"}

    def change(row, key):
        return f"{100 * (row[key] / base[row['model']][key] - 1):+.0f}%"

    for row in (r for r in rows if r["level"] == "O3"):
        lines.append(f"  {row['model']:<5} memory {change(row, 'paper_memory_gb')} / {change(row, 'memory_gb')}, "
                     f"traffic {change(row, 'paper_weight_traffic_gb')} / {change(row, 'weight_traffic_gb')}")
    return "\n".join(lines + ["", PAPER_NOTES])
