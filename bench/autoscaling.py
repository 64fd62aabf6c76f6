"""Pre-scaling, post-scaling and auto-scaling of FP8 weight gradients in the data-parallel
reduction, on real gradients of the tiny GPT at DP 8 (the spirit of the FP8-LM paper's Figure 7).

    python bench/autoscaling.py [--iters 60] [--samples 20 40 60] [--window 20] [--out PATH]

Protocol. Eight gloo processes (`tests/distributed.py`'s `run_distributed`) each hold the same
`configs/gpt-tiny.yaml` GPT (2 layers, hidden 128, FFN 512, 4 heads, RoPE, RMSNorm, seq 128,
Megatron initialisation, seed 1234), FP32 throughout, and train it data-parallel on the built-in
corpus: at iteration t rank r takes its own micro-batch (samples (8t + r) x 4 ... + 3 of the
corpus's training split), the ranks' FP32 gradients are averaged exactly (`all_reduce`), clipped
to norm 1 and applied by AdamW (LR 3e-3 after a 10-iteration linear warm-up, betas 0.9/0.95,
weight decay 0.1). Training never sees an FP8 value, so the gradient stream is the same for all
three methods; iteration t's gradients are those of the weights after t updates.

At every iteration each rank takes the gradients of the eight FP8 linear weights (`linear_qkv`,
`linear_proj`, `linear_fc1`, `linear_fc2` of both layers; 393,216 values) from its own
micro-batch, before the average, casts each to E4M3 with a per-tensor current scale
(`fp8.quantize(g, "e4m3")`, as the FP8 linears do) and reduces them with
`fp8.collectives.fp8_all_reduce` three ways:

- pre: mu = 1/8 (divide by N, then sum),
- post: mu = 1 (sum, then divide),
- auto: mu from `fp8.autoscale.GradientAutoScaler(ratio=1e-5, window=--window)`, which starts at
  1 and is updated after every iteration's reduction with that reduction's `overflow_frac` (all
  eight tensors in one call, as the data-parallel wrapper does), so by a sampled iteration it
  has followed the whole gradient stream before it.

At the sampled iterations (default 20, 40, 60: the scaler has seen at least `--window` steps)
each tensor is also reduced on its own by each method, and its result is compared in float64
with the mean of the ranks' unquantized gradients ("SQNR vs exact") and with the mean of the
ranks' FP8 inputs, dequantized ("SQNR vs FP8 in": the reduction's own error). Overflow and
underflow fractions are `ReductionStats.overflow_frac` / `underflow_frac` of the reduction;
the "input" row gives the ranks' own E4M3 casts for comparison (non-zero values flushed to zero,
and the SQNR of the mean of the FP8 inputs against the exact mean). Figures are averaged over the
sampled iterations (SQNR: the mean of the dB values; "all" SQNR over the eight tensors
concatenated). Prints a table and writes JSON (default bench/results/autoscaling-cpu.json) with
every sample per tensor and the per-iteration trajectory (loss, mu and each method's fractions).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import fp8  # noqa: E402
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from fp8.autoscale import GradientAutoScaler  # noqa: E402
from fp8.collectives import ProcessGroupTransport, fp8_all_reduce  # noqa: E402

METHODS = ("pre", "post", "auto")
SHORT = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}


# ----- what each of the N processes runs ----------------------------------------------------------
def build_model(opts: dict):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.parallel_state import ParallelState
    from megatron.core.parallelize import initialize_parameters, parallelize_gpt
    from megatron.core.precision import FP8_LAYER_SUFFIXES
    from megatron.core.transformer.config import TransformerConfig

    config = TransformerConfig(num_layers=opts["num_layers"], hidden_size=opts["hidden_size"],
                               num_attention_heads=opts["num_attention_heads"], vocab_size=opts["vocab_size"],
                               max_position_embeddings=opts["seq_length"], ffn_hidden_size=opts["ffn_hidden_size"],
                               position_embedding_type="rope", normalization="RMSNorm", hidden_dropout=0.0,
                               attention_dropout=0.0, init_method_std=0.02, params_dtype=torch.float32)
    ps = ParallelState.single("cpu")  # every rank a whole replica; the gradient sync is done here
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=opts["seed"], device="cpu")
    linears = [(name, module.weight) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in FP8_LAYER_SUFFIXES]
    return model, linears


def short_name(name: str) -> str:
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "?")
    return f"L{layer}.{SHORT.get(parts[-1], parts[-1])}"


def mean_over_ranks(tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """The float64 mean of every rank's tensors (one all-reduce)."""
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def stats_dict(stats, mu: float) -> dict:
    return {"mu": mu, "overflow_frac": stats.overflow_frac, "underflow_frac": stats.underflow_frac}


def sample_step(q: list, grads: list[torch.Tensor], mus: dict, transport, world: int) -> dict:
    """Every method per tensor, SQNR against the two float64 references, and the input casts."""
    exact = mean_over_ranks(grads, world)
    fp8_in = mean_over_ranks([t.dequantize(torch.float64) for t in q], world)
    # The ranks' own casts: non-zero values flushed to zero, summed over the group.
    counts = torch.tensor([[float(((g != 0) & (t.data.float() == 0)).sum()), float((g != 0).sum())]
                           for g, t in zip(grads, q)], dtype=torch.float64)
    dist.all_reduce(counts)
    cat = lambda parts: torch.cat([p.reshape(-1) for p in parts])  # noqa: E731
    out = {"input": {"per_tensor": [{"underflow_frac": float(c[0] / max(c[1], 1)), "sqnr_db": fp8.sqnr_db(e, f)}
                                    for c, e, f in zip(counts, exact, fp8_in)],
                     "underflow_frac": float(counts[:, 0].sum() / max(counts[:, 1].sum(), 1)),
                     "sqnr_db": fp8.sqnr_db(cat(exact), cat(fp8_in))}}
    for method, mu in mus.items():
        per_tensor, reduced = [], []
        for t, e, f in zip(q, exact, fp8_in):
            result = fp8_all_reduce([t], transport, mu=mu)
            got = result.tensors[0].dequantize(torch.float64)
            reduced.append(got)
            per_tensor.append({**stats_dict(result.stats, mu), "sqnr_db": fp8.sqnr_db(e, got),
                               "sqnr_vs_fp8_in_db": fp8.sqnr_db(f, got)})
        out[method] = {"per_tensor": per_tensor, "sqnr_db": fp8.sqnr_db(cat(exact), cat(reduced)),
                       "sqnr_vs_fp8_in_db": fp8.sqnr_db(cat(fp8_in), cat(reduced))}
    return out


def rank_main(rank: int, world: int, opts: dict, tokens: torch.Tensor):
    torch.manual_seed(opts["seed"])
    model, linears = build_model(opts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    scaler = GradientAutoScaler(ratio=opts["ratio"], window=opts["window"])
    transport = ProcessGroupTransport()
    samples, trajectory = {}, []
    started = time.perf_counter()
    for it in range(opts["iters"] + 1):
        batch = tokens[it, rank]
        model.zero_grad(set_to_none=True)
        loss = model(batch[:, :-1], batch[:, 1:]).float().mean()
        loss.backward()
        grads = [w.grad.detach().clone() for _, w in linears]
        q = [fp8.quantize(g, "e4m3") for g in grads]
        mus = {"pre": 1.0 / world, "post": 1.0, "auto": scaler.mu}
        step = {"iteration": it, "loss": None}
        for method, mu in mus.items():  # all eight tensors in one reduction, as training does
            step[method] = stats_dict(fp8_all_reduce(q, transport, mu=mu).stats, mu)
        scaler.update(step["auto"]["overflow_frac"])
        if it in opts["samples"]:
            samples[it] = sample_step(q, grads, mus, transport, world)
        # Exact FP32 data-parallel training step (the stream all three methods see).
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        reported = torch.cat([flat, loss.detach().reshape(1)])
        dist.all_reduce(reported)
        reported /= world
        offset = 0
        for p in params:
            p.grad.copy_(reported[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        step["loss"] = float(reported[-1])
        trajectory.append(step)
        if it == opts["iters"]:
            break
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = opts["lr"] * min(1.0, (it + 1) / opts["warmup"])
        optimizer.step()
        if rank == 0 and opts["verbose"] and (it % 10 == 0):
            print(f"  iteration {it:>3}  loss {step['loss']:.3f}  auto mu {step['auto']['mu']:.4f}  "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    # Every rank done, then leave the group here: run_distributed stops the workers once it has
    # every result, and a rank still inside the group would see its peers vanish (noise on stderr).
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"tensors": [short_name(n) for n, _ in linears], "numel": [w.numel() for _, w in linears],
            "samples": samples, "trajectory": trajectory, "final_mu": scaler.mu,
            "seconds": time.perf_counter() - started}


# ----- the parent: data, launch, summary -----------------------------------------------------------
def load_tokens(data_path: str, tokenizer_model: str, iters: int, world: int, micro_batch: int,
                seq_length: int, seed: int) -> tuple[torch.Tensor, int]:
    """[iters + 1, world, micro_batch, seq_length + 1] token ids from the corpus's training split,
    in the dataset's shuffled order; and the vocabulary size padded to a multiple of 64."""
    from megatron.core.datasets.builder import build_gpt_datasets
    from megatron.core.datasets.config import GPTDatasetConfig
    from megatron.core.tokenizers.tokenizer import SentencePieceTokenizer

    vocab = SentencePieceTokenizer(tokenizer_model).vocab_size
    count = (iters + 1) * world * micro_batch
    with tempfile.TemporaryDirectory() as cache:
        config = GPTDatasetConfig(data_path=[data_path], seq_length=seq_length, split="98,2,0", seed=seed,
                                  data_cache_path=cache)
        train = build_gpt_datasets(config, [count, 0, 0])[0]
        tokens = torch.stack([torch.from_numpy(train.sample_tokens(i)) for i in range(count)])
    return tokens.view(iters + 1, world, micro_batch, seq_length + 1), -(-vocab // 64) * 64


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(result: dict, samples: list[int]) -> dict:
    """Each method's figures averaged over the sampled iterations, overall and per tensor."""
    by_it = {s["iteration"]: s for s in result["trajectory"]}
    rows, per_tensor = [], []
    taken = [result["samples"][it] for it in samples]
    rows.append({"method": "input", "mu": None, "overflow_frac": None,
                 "underflow_frac": mean(s["input"]["underflow_frac"] for s in taken),
                 "sqnr_db": mean(s["input"]["sqnr_db"] for s in taken), "sqnr_vs_fp8_in_db": None})
    for method in METHODS:
        rows.append({"method": method, "mu": mean(by_it[it][method]["mu"] for it in samples),
                     "mu_at_samples": [by_it[it][method]["mu"] for it in samples],
                     "overflow_frac": mean(by_it[it][method]["overflow_frac"] for it in samples),
                     "underflow_frac": mean(by_it[it][method]["underflow_frac"] for it in samples),
                     "sqnr_db": mean(s[method]["sqnr_db"] for s in taken),
                     "sqnr_vs_fp8_in_db": mean(s[method]["sqnr_vs_fp8_in_db"] for s in taken)})
    for i, (name, numel) in enumerate(zip(result["tensors"], result["numel"])):
        row = {"tensor": name, "numel": numel,
               "input": {k: mean(s["input"]["per_tensor"][i][k] for s in taken) for k in ("underflow_frac", "sqnr_db")}}
        for method in METHODS:
            row[method] = {k: mean(s[method]["per_tensor"][i][k] for s in taken)
                           for k in ("overflow_frac", "underflow_frac", "sqnr_db", "sqnr_vs_fp8_in_db")}
        per_tensor.append(row)
    return {"rows": rows, "per_tensor": per_tensor}


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.4f}"


def db(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(summary: dict, result: dict, samples: list[int]) -> None:
    print(f"\naveraged over iterations {', '.join(map(str, samples))}; all 8 FP8 linear weights "
          f"({sum(result['numel']):,} values)")
    print(f"{'method':<7} {'mu':>8} {'overflow %':>11} {'underflow %':>12} {'SQNR vs exact':>14} {'SQNR vs FP8 in':>15}")
    for row in summary["rows"]:
        mu = "-" if row["mu"] is None else f"{row['mu']:.4f}"
        print(f"{row['method']:<7} {mu:>8} {pct(row['overflow_frac']):>11} {pct(row['underflow_frac']):>12} "
              f"{db(row['sqnr_db']):>14} {db(row['sqnr_vs_fp8_in_db']):>15}")
    print("\nper tensor: overflow % / underflow % / SQNR vs exact dB")
    print(f"{'tensor':<8} {'numel':>7} {'input uf% / dB':>16} " + " ".join(f"{m:>26}" for m in METHODS))
    for row in summary["per_tensor"]:
        cells = [f"{pct(row[m]['overflow_frac'])} / {pct(row[m]['underflow_frac'])} / {db(row[m]['sqnr_db'])}"
                 for m in METHODS]
        print(f"{row['tensor']:<8} {row['numel']:>7} "
              f"{pct(row['input']['underflow_frac']) + ' / ' + db(row['input']['sqnr_db']):>16} "
              + " ".join(f"{c:>26}" for c in cells))
    auto = next(row for row in summary["rows"] if row["method"] == "auto")
    print(f"\nauto mu at the sampled iterations: " + " ".join(f"{m:.4f}" for m in auto["mu_at_samples"]))
    mus = [s["auto"]["mu"] for s in result["trajectory"]]
    print(f"auto mu by iteration (every 5th): " + " ".join(f"{m:.3g}" for m in mus[::5])
          + f"; ends on {result['final_mu']:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=60, help="optimizer steps; gradients at 0..iters")
    parser.add_argument("--samples", type=int, nargs="+", default=[20, 40, 60],
                        help="iterations at which each tensor is reduced on its own and SQNR measured")
    parser.add_argument("--world-size", type=int, default=8, help="data-parallel size (gloo processes)")
    parser.add_argument("--window", type=int, default=20, help="auto-scaler window (the paper's is 1000)")
    parser.add_argument("--ratio", type=float, default=1e-5, help="auto-scaler overflow threshold")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--ffn-hidden-size", type=int, default=512)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--data-path", default=None, help="corpus prefix (default: the built-in corpus)")
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    bad = [s for s in args.samples if not 0 <= s <= args.iters]
    if bad or args.world_size < 2:
        print(f"error: --samples must lie in [0, --iters] (got {bad}) and --world-size must be >= 2",
              file=sys.stderr)
        return 2
    samples = sorted(set(args.samples))
    if args.data_path is None or args.tokenizer_model is None:
        from bench.train_step import corpus_args
        corpus = corpus_args()
        args.data_path = args.data_path or corpus[corpus.index("--data-path") + 1]
        args.tokenizer_model = args.tokenizer_model or corpus[corpus.index("--tokenizer-model") + 1]
    tokens, vocab = load_tokens(args.data_path, args.tokenizer_model, args.iters, args.world_size,
                                args.micro_batch_size, args.seq_length, args.seed)
    opts = {"iters": args.iters, "samples": samples, "window": args.window, "ratio": args.ratio,
            "num_layers": args.num_layers, "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size,
            "num_attention_heads": args.num_attention_heads, "seq_length": args.seq_length, "vocab_size": vocab,
            "lr": args.lr, "warmup": args.warmup, "seed": args.seed, "verbose": True}
    sys.path.insert(0, str(REPO / "tests"))
    from distributed import run_distributed
    from bench import autoscaling as this  # workers import the function by its module name

    print(f"DP {args.world_size}, {args.iters} iterations, sampled at {samples}; auto-scaler ratio "
          f"{args.ratio:g}, window {args.window}", flush=True)
    started = time.perf_counter()
    result = run_distributed(this.rank_main, args.world_size, opts, tokens, timeout=3600.0)[0]
    wall = time.perf_counter() - started
    summary = summarize(result, samples)
    print_tables(summary, result, samples)
    meta = run_meta("autoscaling.py", argv, torch=torch.__version__, wall_s=round(wall, 1))
    config = {k: v for k, v in opts.items() if k != "verbose"}
    config.update(world_size=args.world_size, micro_batch_size=args.micro_batch_size,
                  data_path=args.data_path, training="FP32, exact gradient mean, AdamW, clip 1.0")
    save_results(args.out or RESULTS / "autoscaling-cpu.json", meta, config=config, rows=summary["rows"],
                 per_tensor=summary["per_tensor"], auto_final_mu=result["final_mu"],
                 mu_trajectory=[s["auto"]["mu"] for s in result["trajectory"]],
                 trajectory=result["trajectory"], tensors=result["tensors"], numel=result["numel"],
                 samples={str(k): v for k, v in result["samples"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
