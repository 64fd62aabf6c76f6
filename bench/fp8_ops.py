"""Time the FP8 building blocks: quantize / dequantize, fp8_matmul (native and emulated), and
FP8Linear forward+backward against nn.Linear in BF16, at a few square sizes; the casts and
FP8Linear with eager and with fused casts (`fp8/fused.py`; the fused bytes are checked equal).

    python bench/fp8_ops.py [--device cuda] [--sizes 1024 4096] [--iters 20] [--casts eager fused] [--out FILE.json]

Prints a table and writes JSON (default bench/results/fp8_ops-<device>.json). On CUDA the GEMM
rows also give TFLOP/s.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fp8  # noqa: E402
from fp8 import fused  # noqa: E402
from bench.common import RESULTS, requested_device, run_meta, save_results  # noqa: E402
from fp8.gemm import device_info, select_path  # noqa: E402


def timed(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


CAST_MODES = {"eager": "off", "fused": "on"}


def bench_casts(n: int, device, iters: int, casts: list[str]) -> list[dict]:
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rows = []
    for granularity in ("tensor", "row", "block"):
        first = None
        for cast in casts:
            fused.set_mode(CAST_MODES[cast])
            q = fp8.quantize(x, "e4m3", granularity=granularity)
            row = {"op": f"quantize[{granularity}] {cast}", "size": n,
                   "seconds": timed(lambda: fp8.quantize(x, "e4m3", granularity=granularity), device, iters)}
            if first is None:
                first = q
            else:
                same = torch.equal(q.scale, first.scale) and fused.same_bits(q.data, first.data)
                row["same_bytes_as_" + casts[0]] = same
            rows.append(row)
        rows.append({"op": f"dequantize[{granularity}]", "size": n,
                     "seconds": timed(lambda: q.dequantize(torch.bfloat16), device, iters)})
    fused.set_mode("auto")
    return rows


def bench_gemms(n: int, device, iters: int) -> list[dict]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rows = [{"op": "matmul bf16", "size": n, "seconds": timed(lambda: a @ w.t(), device, iters)}]
    for granularity in ("tensor", "row", "block"):
        a_fp8 = fp8.quantize(a, "e4m3", granularity=granularity)
        w_fp8 = fp8.quantize(w, "e4m3", granularity=granularity, role="weight")
        path, reason = select_path(a_fp8, w_fp8.t(), torch.bfloat16, device_info(a_fp8.device))
        paths = [path] + (["emulate"] if path != "emulate" else [])
        for p in paths:
            seconds = timed(lambda: fp8.fp8_matmul(a_fp8, w_fp8.t(), torch.bfloat16, path=p), device, iters)
            rows.append({"op": f"fp8_matmul[{granularity}] {p}", "size": n, "seconds": seconds,
                         "note": reason if p == path else "forced emulation"})
    for row in rows:
        row["tflops"] = 2 * n**3 / row["seconds"] / 1e12
    return rows


def bench_linear(n: int, tokens: int, device, iters: int, casts: list[str]) -> list[dict]:
    x = torch.randn(tokens, n, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
    layers = {"nn.Linear bf16": ("auto", nn.Linear(n, n, device=device, dtype=torch.bfloat16))}
    for recipe in fp8.scaling.RECIPES:
        for cast in casts:
            layer = fp8.FP8Linear(n, n, device=device, recipe=fp8.Recipe(recipe=recipe, min_features=0))
            layers[f"FP8Linear {recipe} {cast}"] = (CAST_MODES[cast], layer)
    rows = []
    for name, (mode, layer) in layers.items():
        def step():
            x.grad = None
            layer(x).backward(dy)
        fused.set_mode(mode)
        seconds = timed(step, device, iters)
        rows.append({"op": f"{name} fwd+bwd", "size": n, "tokens": tokens, "seconds": seconds,
                     "tflops": 6 * tokens * n * n / seconds / 1e12})
    return rows


def print_table(rows: list[dict], device) -> None:
    show_tflops = device.type == "cuda"
    header = f"{'op':<40} {'size':>6} {'ms':>10}" + (f" {'TFLOP/s':>9}" if show_tflops else "")
    print(header)
    print("-" * len(header))
    for r in rows:
        line = f"{r['op']:<40} {r['size']:>6} {r['seconds'] * 1e3:>10.3f}"
        if show_tflops and "tflops" in r:
            line += f" {r['tflops']:>9.1f}"
        print(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="square GEMM sizes (default: 512 1024 2048 on CPU, 1024 4096 8192 on CUDA)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per FP8Linear call (default: the size)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--casts", nargs="+", default=["eager", "fused"], choices=list(CAST_MODES),
                        help="FP8 cast modes to time (fused compiles each kind of cast once, untimed)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = requested_device(args.device)
    if device is None:
        return 2
    sizes = args.sizes or ([1024, 4096, 8192] if device.type == "cuda" else [512, 1024, 2048])
    iters = args.iters or (50 if device.type == "cuda" else 5)
    torch.manual_seed(0)
    rows = []
    for n in sizes:
        rows += bench_casts(n, device, iters, args.casts) + bench_gemms(n, device, iters)
        rows += bench_linear(n, args.tokens or n, device, iters, args.casts)
    fused.set_mode("auto")
    print_table(rows, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = run_meta("fp8_ops.py", argv, device=device_name, torch=torch.__version__, threads=torch.get_num_threads())
    save_results(args.out or RESULTS / f"fp8_ops-{device.type}.json", meta, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
