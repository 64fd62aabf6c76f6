"""Time one FP8AdamW step, per tensor (``foreach=False``) against the multi-tensor path, over the
linear weights of a GPT (per layer: QKV 3h x h, projection h x h, FC1 4h x h, FC2 h x 4h).

    python bench/fp8_optim.py                                  # 12 layers, hidden 768, CPU
    python bench/fp8_optim.py --layers 24 --hidden 2048 --device cuda --chunk-numel 16777216
    python bench/fp8_optim.py --hidden 256 --layers 4 --iters 5 --foreach-numel 0 8388608

States: "o2" is the paper's (FP8 first moment, FP16 second moment, FP16 masters with per-tensor
scales, FP8 gradients from an `FP8GradStore`); "fp32" is FP32 weights, moments and gradients.
The multi-tensor path runs once per ``--foreach-numel`` (0: the optimizer's default bound,
``chunk_numel``; a larger bound batches larger tensors too, for a larger FP32 working set). On a
GPU, where each chunk of the per-tensor path costs tens of kernel launches, try a larger
``--chunk-numel`` too. Every run starts from the same weights and gradients and takes the same
number of steps, so each is then checked against the per-tensor run's bits (weights, scales,
moments): the column "same bits" (the exit status is 1 where one differs).

Prints a table (median and least seconds per step after ``--warmup`` steps, the variants stepped
by turns; speed-up of the median over the per-tensor path) and writes JSON (default
bench/results/fp8_optim-<device>-<date>.json).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, requested_device, run_meta, save_results  # noqa: E402
from fp8.gradients import FP8GradStore  # noqa: E402
from fp8.optim import FP8AdamW, is_scaled_fp16, make_scaled_fp16_param  # noqa: E402
from fp8.scaling import default_chunk_numel  # noqa: E402
from fp8.tensor import ScalingTensor, quantize  # noqa: E402

STATES = {
    "o2": {"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp16"},
    "fp32": {"exp_avg_dtype": "fp32", "exp_avg_sq_dtype": "fp32"},
}


def gpt_weight_shapes(hidden: int, layers: int) -> list[tuple[int, int]]:
    per_layer = [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)]
    return per_layer * layers


def make_values(shapes, states: str, device: torch.device) -> list[tuple[torch.Tensor, object]]:
    """(initial weight, gradient) per weight: FP32 gradients, or FP8 ones (`ScalingTensor`) for
    "o2". Read only by the optimizers, so every run shares them."""
    gen = torch.Generator().manual_seed(0)
    values = []
    for shape in shapes:
        value = torch.randn(shape, generator=gen) * 0.02
        grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        values.append((value, quantize(grad, "e4m3") if states == "o2" else grad))
    return values


def build(values, states: str, device: torch.device, foreach: bool, foreach_numel: int | None,
          chunk_numel: int):
    """Weights and an FP8AdamW (weight decay 0.1, as in training) over them, from `values`."""
    params, grads, store = [], {}, FP8GradStore()
    for value, grad in values:
        p = torch.nn.Parameter(value.to(device))
        if states == "o2":
            make_scaled_fp16_param(p)
            store.set(p, grad)
        else:
            grads[id(p)] = grad
        params.append(p)
    opt = FP8AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fp8_grads=store,
                   grad_of=lambda p: grads.get(id(p)), foreach=foreach, foreach_numel=foreach_numel,
                   chunk_numel=chunk_numel, **STATES[states])
    opt.init_states()
    return params, opt


def digest(params, opt) -> str:
    """A hash of every weight, scale and moment, to compare runs to the bit."""
    h = hashlib.sha256()

    def add(t: torch.Tensor) -> None:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())

    for p in params:
        add(p)
        if is_scaled_fp16(p):
            add(p.scale)
        for key in ("exp_avg", "exp_avg_sq"):
            stored = opt.state[p][key]
            for t in ((stored.data, stored.scale) if isinstance(stored, ScalingTensor) else (stored,)):
                add(t)
    return h.hexdigest()


def timed_step(opt, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _values(n: int) -> str:
    return f"{n / 2**20:g}M" if n % 2**18 == 0 else str(n)


def run(shapes, states: str, device, warmup: int, iters: int, bounds: list[int], chunk_numel: int) -> list[dict]:
    """Every variant built at once and stepped by turns, so that a machine whose load changes
    while the benchmark runs slows them alike."""
    values = make_values(shapes, states, device)
    variants = [("per tensor", False, None)] + [
        (f"foreach, bound {'= chunk' if bound == 0 else _values(bound)}", True, bound or None) for bound in bounds]
    built = [build(values, states, device, foreach, bound, chunk_numel) for _, foreach, bound in variants]
    samples = [[] for _ in variants]
    for i in range(warmup + iters):
        for (params, opt), times in zip(built, samples):
            seconds = timed_step(opt, device)
            if i >= warmup:
                times.append(seconds)
    digests = [digest(params, opt) for params, opt in built]
    rows = []
    for (name, foreach, _), (params, opt), times, bits in zip(variants, built, samples, digests):
        times.sort()
        rows.append({"states": states, "path": name, "foreach": foreach, "foreach_numel": opt.foreach_numel,
                     "chunk_numel": opt.chunk_numel, "tensors": len(params), "values": sum(p.numel() for p in params),
                     "seconds": times[len(times) // 2], "min_seconds": times[0], "same_bits": bits == digests[0]})
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    del built, values
    gc.collect()
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'states':<6} {'path':<24} {'ms/step':>10} {'min ms':>10} {'speed-up':>9} {'same bits':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['states']:<6} {r['path']:<24} {r['seconds'] * 1e3:>10.1f} {r['min_seconds'] * 1e3:>10.1f} "
              f"{r['speedup']:>8.2f}x "
              f"{'yes' if r['same_bits'] else 'NO':>10}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--states", nargs="+", default=list(STATES), choices=list(STATES))
    parser.add_argument("--foreach-numel", type=int, nargs="+", default=[0, 8 << 20],
                        help="bounds of the multi-tensor batches to time (0: the optimizer's default)")
    parser.add_argument("--chunk-numel", type=int, default=default_chunk_numel(),
                        help="values per chunk of the per-tensor path (and the default bound of a batch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = requested_device(args.device)
    if device is None:
        return 2
    iters = args.iters or (20 if device.type == "cuda" else 5)
    shapes = gpt_weight_shapes(args.hidden, args.layers)
    print(f"{len(shapes)} weights, {sum(a * b for a, b in shapes) / 1e6:.1f}M values "
          f"({args.layers} layers, hidden {args.hidden}), {device}, chunks of {_values(args.chunk_numel)} values, "
          f"median of {iters} steps after {args.warmup}\n")
    rows = []
    for states in args.states:
        rows += run(shapes, states, device, args.warmup, iters, args.foreach_numel, args.chunk_numel)
    print_table(rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = run_meta("fp8_optim.py", argv, device=device_name, torch=torch.__version__, threads=torch.get_num_threads(),
                    hidden=args.hidden, layers=args.layers, chunk_numel=args.chunk_numel, warmup=args.warmup,
                    iters=iters)
    date = datetime.date.today().isoformat()
    save_results(args.out or RESULTS / f"fp8_optim-{device.type}-{date}.json", meta, rows=rows)
    return 0 if all(row["same_bits"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
