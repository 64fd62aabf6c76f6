"""One-H200 benchmark suite (< 8 minutes): FP8 GEMM speed, FP8 linear speed, a ~1B GPT's step at
each precision level, and the CUDA FP8 GEMM against the CPU emulation.

    python bench/gpu_suite.py                        # on the GPU; JSON at bench/results/gpu_suite.json
    python bench/gpu_suite.py --dry-run              # CPU, tiny sizes, well under a minute (CI)
    python bench/gpu_suite.py --sections gemm sqnr --budget-scale 2

Sections, each with its own time budget (seconds, scaled by --budget-scale); when a section's
budget is spent its remaining cases are recorded as {"skipped": "time budget"}, and a section that
raises records the exception and the run goes on:

- environment: torch / CUDA / device.
- step_audit: one training step of a 2-layer, hidden-1024 GPT (2 micro-batches) at none, O0 and
  O3, counted as bench/launch_audit.py counts it (dispatched kernel-launching operations and host
  syncs) and on the device: the CUDA kernels torch.profiler records and the syncs
  `torch.cuda.set_sync_debug_mode("warn")` flags (dry: hidden 128, dispatch counts only).
- gemm: `fp8_matmul` (which calls `torch._scaled_mm` / `F.scaled_mm`) TFLOP/s with tensorwise,
  rowwise and blockwise scales against BF16 `torch.matmul`, square 4096 and 8192 (dry: 64, 128).
- sqnr: the FP8 GEMM on the device against the CPU emulation (`emulated_matmul`) and against
  float64 (of the same FP8 operands, and of the unquantized inputs), in dB. In the dry run the
  device is the CPU, whose `torch._scaled_mm` stands in for CUDA.
- casts: `fp8.tensor.quantize` of an 8192-token activation of width 4096 and 8192 (dry: 64 x 128),
  per-tensor, row-wise and block-wise, eager (chunked PyTorch operations) against fused (two
  compiled kernels, `fp8/fused.py`): milliseconds, GB/s of the BF16 input read, and whether the
  fused bytes and scales equal the eager ones (NaN's sign aside).
- fp8_linear: a transformer layer's linears (qkv h->3h, proj h->h, fc1 h->4h, fc2 4h->h) as
  `fp8.FP8Linear` (each recipe, FP8 weight gradients accumulated over 3 micro-batches of 4096
  tokens, each weight cast once per step, as O1-O3 train) against BF16 `nn.Linear`, forward +
  backward, at hidden 1024, 2048, 4096 and 8192 (dry: 32, 64, 128; 2 micro-batches of 64), and per
  recipe the crossover: the narrowest hidden size from which FP8 is faster at every larger one
  measured, the value for `--fp8-min-features` (narrower linears then stay in BF16); None
  where FP8 is slower at every width. Casts are fused as `--fused-casts` says (auto: on CUDA).
  The crossovers are also written as a calibration file (`fp8/calibration.py`), beside the JSON
  as `fp8_calibration.json`: `--fp8-calibration` takes it, or commit it to `fp8/calibrations/`.
- gpt: a ~1B GPT (24 layers, hidden 2048, FFN 8192, 16 heads, seq 2048, vocabulary 32768,
  micro-batch 4, BF16 parameters) trained in-process through `bench.common.build_gpt_training`
  (the model / DDP / optimizer / `apply_precision` code of the trainer, as bench/gpu_check.py does)
  at --fp8-level none, O0, O2, O3 with the same micro-batch: median step time, tokens/s, MFU
  (megatron.training.metrics: model_flops_per_token / peak_flops) and peak CUDA memory.
  Dry run: 2 layers, hidden 128, 2 steps.

The JSON is rewritten after every section (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import fp8  # noqa: E402
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from bench.gpu_check import (_jsonable, error_entry, exact_value, guarded, median_seconds, synthetic_batches,  # noqa: E402
                             train_level)
from fp8 import fused  # noqa: E402
from fp8.calibration import calibration_record  # noqa: E402
from fp8.gemm import device_info, emulated_matmul, fp8_matmul, select_path  # noqa: E402
from fp8.tensor import quantize  # noqa: E402
from megatron.training.metrics import model_flops_per_token, peak_flops  # noqa: E402

SECTIONS = ("environment", "step_audit", "gemm", "sqnr", "casts", "fp8_linear", "gpt")
BUDGETS = {"environment": 10.0, "step_audit": 45.0, "gemm": 45.0, "sqnr": 25.0, "casts": 40.0, "fp8_linear": 90.0, "gpt": 250.0}
LEVELS = ("none", "O0", "O2", "O3")
SCALINGS = ("tensorwise", "rowwise", "blockwise")
SKIPPED = {"ok": False, "skipped": "time budget"}

GPT_1B = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192, vocab_size=32768,
              seq_length=2048, micro_batch_size=4, steps=12, min_features=128, lr=3e-4, warmup=5)
GPT_DRY = dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, vocab_size=256,
               seq_length=32, micro_batch_size=2, steps=2, min_features=64, lr=3e-4, warmup=2)


class Ctx:
    """What bench/gpu_check.py's helpers expect (device, cuda, sync, time_left), with a deadline
    that each section (and each GPT level) sets for itself."""

    def __init__(self, device: torch.device, dry: bool, scale: float):
        self.device, self.dry, self.scale = device, dry, scale
        self.cuda = device.type == "cuda"
        self.deadline = math.inf

    def start(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |out - ref|^2), in float64 on the CPU; capped at 300 dB (identical)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    noise = (out - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return 300.0 if noise == 0 else min(300.0, 10 * math.log10(signal / noise))


def operands(x: torch.Tensor, w: torch.Tensor, scaling: str):
    """FP8 operands for x @ w.t() as FP8Linear builds them: E4M3, per-tensor / row / block scales."""
    if scaling == "tensorwise":
        return quantize(x, "e4m3"), quantize(w, "e4m3").t()
    gran = "row" if scaling == "rowwise" else "block"
    return (quantize(x, "e4m3", granularity=gran, power_of_two=True),
            quantize(w, "e4m3", granularity=gran, role="weight", power_of_two=True).t())


def reps(ctx: Ctx) -> tuple[int, int]:
    return (3, 1) if ctx.dry else (20, 5)


# ----- environment -------------------------------------------------------------------------------
def section_environment(ctx: Ctx) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(ctx.device), "dry_run": ctx.dry, "has_scaled_mm": hasattr(torch, "_scaled_mm")}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(device_name=props.name, capability=list(torch.cuda.get_device_capability(ctx.device)),
                   total_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        out.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return out


# ----- gemm --------------------------------------------------------------------------------------
def section_gemm(ctx: Ctx) -> dict:
    sizes = [64, 128] if ctx.dry else [4096, 8192]
    n_reps, warmup = reps(ctx)
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        x = torch.randn(size, size, device=ctx.device, dtype=torch.bfloat16)
        w = torch.randn(size, size, device=ctx.device, dtype=torch.bfloat16) * 0.02
        base = None
        cases = [("bf16", None)] + [(s, operands(x, w, s)) for s in SCALINGS]
        for name, ops in cases:
            row = {"op": name, "size": size}
            if ctx.time_left() <= 0:
                rows.append({**row, **SKIPPED})
                continue
            if ops is None:
                fn = lambda: torch.matmul(x, w.t())  # noqa: E731
                row["path"] = "torch.matmul"
            else:
                a, b = ops
                row["path"], row["reason"] = select_path(a, b, torch.bfloat16, device_info(a.device))
                # per-tensor and row-wise forward GEMMs use fast accumulation; cuBLAS refuses it for blocks
                fast = ctx.cuda and name != "blockwise"
                row["fast_accum"] = fast
                fn = lambda a=a, b=b, fast=fast: fp8_matmul(a, b, torch.bfloat16, fast_accum=fast)  # noqa: E731
            row.update(guarded(ctx, lambda: {"seconds": median_seconds(ctx, fn, n_reps, warmup)}))
            if row["ok"]:
                row["tflops"] = 2 * size**3 / row["seconds"] / 1e12
                if name == "bf16":
                    base = row["seconds"]
                elif base:
                    row["speedup_vs_bf16"] = base / row["seconds"]
            rows.append(row)
        del x, w, cases
        if ctx.cuda:
            torch.cuda.empty_cache()
    return {"rows": rows, "reps": n_reps, "warmup": warmup}


# ----- sqnr --------------------------------------------------------------------------------------
def section_sqnr(ctx: Ctx) -> dict:
    m, k, n = (128, 256, 128) if ctx.dry else (4096, 4096, 4096)
    gen = torch.Generator().manual_seed(7)
    x_hp = torch.randn(m, k, generator=gen)
    w_hp = torch.randn(n, k, generator=gen) * 0.02
    ref_hp = x_hp.double() @ w_hp.double().t()
    rows = []
    for scaling in SCALINGS:
        # per-tensor can give FP32 output; row-wise and block-scaled kernels give BF16 only
        out_dtype = torch.float32 if scaling == "tensorwise" else torch.bfloat16
        row = {"scaling": scaling, "fmt": "e4m3", "shape": [m, k, n], "out_dtype": str(out_dtype).split(".")[1]}
        if ctx.time_left() <= 0:
            rows.append({**row, **SKIPPED})
            continue

        def measure():
            a, b = operands(x_hp.to(ctx.device), w_hp.to(ctx.device), scaling)
            path, reason = select_path(a, b, out_dtype, device_info(a.device))
            out = fp8_matmul(a, b, out_dtype)
            emu = emulated_matmul(a.to("cpu"), b.to("cpu"), torch.float32)
            exact = exact_value(a).cpu() @ exact_value(b).cpu()
            return {"path": path, "reason": reason,
                    "sqnr_vs_cpu_emulation_db": sqnr_db(out, emu.to(out_dtype)),
                    "sqnr_vs_exact_f64_db": sqnr_db(out, exact),
                    "sqnr_vs_f64_db": sqnr_db(out, ref_hp),
                    "cpu_emulation_sqnr_vs_f64_db": sqnr_db(emu, ref_hp),
                    "finite": bool(torch.isfinite(out).all().item())}

        rows.append({**row, **guarded(ctx, measure)})
    return {"rows": rows, "note": "sqnr_vs_f64_db includes FP8 quantization of the inputs; "
            "sqnr_vs_exact_f64_db is the product of the same FP8 operands in float64"}


# ----- casts -------------------------------------------------------------------------------------
def section_casts(ctx: Ctx) -> dict:
    shapes = [(64, 128)] if ctx.dry else [(8192, 4096), (8192, 8192)]
    n_reps, warmup = reps(ctx)
    rows = []
    before = fused.mode()
    try:
        for tokens, width in shapes:
            torch.manual_seed(2)
            x = torch.randn(tokens, width, device=ctx.device, dtype=torch.bfloat16)
            for granularity in ("tensor", "row", "block"):
                row = {"tokens": tokens, "width": width, "granularity": granularity}
                if ctx.time_left() <= 0:
                    rows.append({**row, **SKIPPED})
                    continue

                def measure(granularity=granularity):
                    out, cast = {}, {}
                    for mode in ("off", "on"):
                        fused.set_mode(mode)
                        cast[mode] = quantize(x, "e4m3", granularity=granularity)
                        seconds = median_seconds(ctx, lambda: quantize(x, "e4m3", granularity=granularity),
                                                 n_reps, warmup)
                        key = "fused" if mode == "on" else "eager"
                        out[f"{key}_ms"] = seconds * 1e3
                        out[f"{key}_gb_per_s"] = x.numel() * 2 / seconds / 1e9
                    out["speedup"] = out["eager_ms"] / out["fused_ms"]
                    out["bit_identical"] = (torch.equal(cast["off"].scale, cast["on"].scale)
                                            and fused.same_bits(cast["off"].data, cast["on"].data))
                    return out

                row.update(guarded(ctx, measure))
                rows.append(row)
            del x
    finally:
        fused.set_mode(before)
    return {"rows": rows, "reps": n_reps, "warmup": warmup,
            "all_bit_identical": all(r.get("bit_identical") for r in rows if r.get("ok"))}


# ----- fp8_linear --------------------------------------------------------------------------------
def crossover(rows: list[dict]) -> dict[str, int | None]:
    """Per FP8 recipe, the narrowest measured width from which FP8Linear beats BF16 at that width
    and every wider one (a skipped or failed width counts as not beating it); None if none."""
    out = {}
    for recipe in sorted({r["recipe"] for r in rows} - {"bf16"}):
        widths = sorted((r["in_features"], bool(r.get("ok")) and r.get("speedup_vs_bf16", 0) > 1)
                        for r in rows if r["recipe"] == recipe)
        best = None
        for width, wins in reversed(widths):
            if not wins:
                break
            best = width
        out[recipe] = best
    return out


def layer_shapes(hidden: int) -> list[tuple[str, int, int]]:
    """A transformer layer's linears at hidden size `hidden` (4x FFN): (name, in, out). Each has
    `hidden` as its narrower side, the width that --fp8-min-features compares."""
    return [("qkv", hidden, 3 * hidden), ("proj", hidden, hidden), ("fc1", hidden, 4 * hidden),
            ("fc2", 4 * hidden, hidden)]


def section_fp8_linear(ctx: Ctx) -> dict:
    """A transformer layer's four linears (`layer_shapes`) at each hidden size, forward + backward
    over `micro_batches` micro-batches as a training step runs them: FP8 weight gradients
    accumulated in FP8 (as at O1-O3), each weight cast once per step, against BF16 `nn.Linear`s
    accumulating theirs."""
    sizes = [32, 64, 128] if ctx.dry else [1024, 2048, 4096, 8192]
    tokens, micro_batches = (64, 2) if ctx.dry else (4096, 3)
    n_reps, warmup = reps(ctx)
    rows = []
    for size in sizes:
        shapes = layer_shapes(size)
        torch.manual_seed(1)
        inputs = [torch.randn(tokens, i, device=ctx.device, dtype=torch.bfloat16, requires_grad=True) for _, i, _ in shapes]
        grads = [torch.randn(tokens, o, device=ctx.device, dtype=torch.bfloat16) * 1e-3 for _, _, o in shapes]
        flops = 6 * tokens * micro_batches * sum(i * o for _, i, o in shapes)
        base = None
        for name in ("bf16",) + fp8.scaling.RECIPES:
            row = {"layer": "nn.Linear bf16" if name == "bf16" else f"FP8Linear {name}", "recipe": name,
                   "tokens": tokens, "micro_batches": micro_batches, "in_features": size,
                   "shapes": [f"{n} {i}x{o}" for n, i, o in shapes], "fp8_wgrad": name != "bf16"}
            if ctx.time_left() <= 0:
                rows.append({**row, **SKIPPED})
                continue

            def measure(name=name):
                if name == "bf16":
                    layers = [nn.Linear(i, o, device=ctx.device, dtype=torch.bfloat16) for _, i, o in shapes]
                else:
                    recipe = fp8.Recipe(recipe=name, min_features=0)  # every width in FP8: it is what is timed
                    layers = [fp8.FP8Linear(i, o, bias=True, recipe=recipe, fp8_wgrad=True, device=ctx.device,
                                            dtype=torch.bfloat16) for _, i, o in shapes]

                def step():
                    for layer in layers:
                        layer.weight.grad = None
                        if name != "bf16":
                            layer.fp8.grads.clear()
                            layer.fp8.keep_weight_copies()  # cast once per step, as the trainer does
                    for _ in range(micro_batches):
                        for layer, x, dy in zip(layers, inputs, grads):
                            layer(x).backward(dy)
                    for layer in layers:
                        if name != "bf16":
                            layer.fp8.drop_weight_copies()

                seconds = median_seconds(ctx, step, n_reps, warmup)
                return {"seconds": seconds, "tflops": flops / seconds / 1e12}

            row.update(guarded(ctx, measure))
            if row["ok"]:
                if name == "bf16":
                    base = row["seconds"]
                elif base:
                    row["speedup_vs_bf16"] = base / row["seconds"]
            rows.append(row)
        del inputs, grads
        if ctx.cuda:
            torch.cuda.empty_cache()
    return {"rows": rows, "reps": n_reps, "warmup": warmup, "fp8_min_features": crossover(rows),
            "fused_casts": fused.active(ctx.device)}


# ----- step_audit --------------------------------------------------------------------------------
AUDIT_MODEL = dict(num_layers=2, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096, vocab_size=8192,
                   seq_length=512, micro_batch_size=4, steps=4, lr=1e-4, min_features=128)
AUDIT_DRY = dict(AUDIT_MODEL, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, vocab_size=256,
                 seq_length=32, micro_batch_size=2)
AUDIT_LEVELS = ("none", "O0", "O3")
AUDIT_MICRO_BATCHES = 2


def audited_step(ctx: Ctx, level: str, cfg: dict, batches: list[torch.Tensor]) -> dict:
    """One training step (2 micro-batches, reduction, optimizer, delayed-scaling update, the loss
    read) of a small GPT at `level`, after two warm-up steps, counted three ways: the ATen
    operations it dispatches (bench/launch_audit.py's counter: launches and host syncs), the CUDA
    kernels the profiler records, and the syncs CUDA's sync debug mode flags."""
    import warnings

    from bench.common import build_gpt_training
    from bench.launch_audit import OpCounter, fused_kernels, host_step_counts
    from megatron.core.parallel_state import ParallelState
    from megatron.core.precision import FP8Config

    ps = ParallelState.single(ctx.device)
    fp8_config = FP8Config(level=level, min_features=cfg["min_features"])
    model, ddp, optimizer, precision = build_gpt_training(cfg, ps, ctx.device, fp8_config, lr=cfg["lr"],
                                                          once_per_step=True)
    micro = [b.to(ctx.device) for b in batches]

    def step(i: int) -> float:
        ddp.zero_grad_buffer()
        losses = []
        for tokens in micro[AUDIT_MICRO_BATCHES * i:AUDIT_MICRO_BATCHES * (i + 1)]:
            loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean() / AUDIT_MICRO_BATCHES
            loss.backward()
            losses.append(loss.detach())
        ddp.finish_grad_sync()
        optimizer.step()
        precision.end_step()
        return ddp.read_with_fp8_stats(torch.stack(losses).sum())  # as the trainer: one read with the FP8 statistics

    step(0)
    step(1)
    ctx.sync()
    counter = OpCounter(host_step_counts(optimizer))  # torch.optim's step counts: host memory on CUDA
    compiled = fused_kernels() if fused.active(ctx.device) else contextlib.nullcontext()
    with compiled, counter, counter.host_copies():  # compiled casts: as many as Inductor writes for the CPU
        step(0)
    row = {"dispatched_launches": counter.kinds["launch"], "dispatched_syncs": counter.kinds["sync"],
           "cuda_kernels": None, "flagged_syncs": None}
    if ctx.cuda:
        from torch.profiler import ProfilerActivity, profile

        with warnings.catch_warnings(record=True) as flagged:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step(1)
                    ctx.sync()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        row["cuda_kernels"] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        row["flagged_syncs"] = sum(1 for w in flagged if "synchroniz" in str(w.message))
    return row


def section_step_audit(ctx: Ctx) -> dict:
    """What bench/launch_audit.py counts, checked on the device (see `audited_step`)."""
    cfg = dict(AUDIT_DRY if ctx.dry else AUDIT_MODEL)
    batches = synthetic_batches(dict(cfg, steps=2 * AUDIT_MICRO_BATCHES))
    levels = {}
    for level in AUDIT_LEVELS:
        levels[level] = dict(SKIPPED) if ctx.time_left() <= 0 else guarded(ctx, audited_step, ctx, level, cfg, batches)
    return {"config": cfg, "micro_batches": AUDIT_MICRO_BATCHES, "levels": levels, "fused_casts": fused.active(ctx.device)}


# ----- gpt ---------------------------------------------------------------------------------------
def section_gpt(ctx: Ctx, levels=LEVELS, steps: int | None = None) -> dict:
    cfg = dict(GPT_DRY if ctx.dry else GPT_1B)
    if steps:
        cfg["steps"] = steps
    batches = synthetic_batches(cfg)
    flops_per_token = model_flops_per_token(cfg["num_layers"], cfg["hidden_size"], cfg["ffn_hidden_size"],
                                            cfg["num_attention_heads"], None, cfg["seq_length"], cfg["vocab_size"],
                                            swiglu=False)
    peak_bf16, peak_fp8 = peak_flops(ctx.device, "bf16"), peak_flops(ctx.device, "fp8")
    section_deadline = ctx.deadline
    out: dict = {"config": cfg, "flops_per_token": flops_per_token, "peak_flops_bf16": peak_bf16,
                 "peak_flops_fp8": peak_fp8, "levels": {}}
    for i, level in enumerate(levels):
        left = section_deadline - time.monotonic()
        if left <= 0:
            out["levels"][level] = dict(SKIPPED)
            continue
        ctx.deadline = time.monotonic() + left / (len(levels) - i)  # an equal share of what is left
        r = guarded(ctx, train_level, ctx, cfg, level, batches)
        if r["ok"]:
            tps = r["tokens_per_s"]
            achieved = tps * flops_per_token
            peak = peak_bf16 if level == "none" else peak_fp8  # the trainer's MFU convention
            r = {"ok": True, "step_time_s": r["median_step_s"], "tokens_per_s": tps,
                 "tflops": achieved / 1e12,
                 "mfu_percent": 100 * achieved / peak if peak else None,
                 "mfu_vs_bf16_peak_percent": 100 * achieved / peak_bf16 if peak_bf16 else None,
                 "peak_memory_bytes": r.get("max_memory_allocated"),
                 "state_bytes_per_param": r["memory_record"]["state_bytes_per_param"],
                 "num_params": r["num_params"], "fp8_layers": r["fp8_layers"], "steps_run": len(r["losses"]),
                 "truncated_by_time_budget": r["truncated_by_time_budget"], "losses": r["losses"],
                 "step_times_s": r["step_times_s"], "skipped_steps": r["skipped"]}
        out["levels"][level] = r
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    ctx.deadline = section_deadline
    base = out["levels"].get("none", {})
    for level, r in out["levels"].items():
        if base.get("ok") and r.get("ok") and level != "none":
            r["speedup_vs_none"] = base["step_time_s"] / r["step_time_s"]
            if base.get("peak_memory_bytes") and r.get("peak_memory_bytes"):
                r["peak_memory_vs_none"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
    return out


# ----- tables ------------------------------------------------------------------------------------
def _f(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _status(r: dict) -> str:
    return "skipped (time budget)" if r.get("skipped") else "ERROR " + r.get("error", "")[:70]


def print_section(name: str, r: dict) -> None:
    print(f"\n== {name} ({r.get('seconds', 0):.1f} s of {r.get('budget_s', 0):.0f}) ==")
    if not r.get("ok"):
        print(_status(r))
        return
    if name == "environment":
        print(f"torch {r['torch']}  cuda {r['cuda']}  {r['device_name']}  {r['device']}")
    elif name == "gemm":
        print(f"{'GEMM':<12} {'size':>5} {'ms':>9} {'TFLOP/s':>8} {'x bf16':>7}  path")
        for row in r["rows"]:
            if not row.get("ok"):
                print(f"{row['op']:<12} {row['size']:>5} {_status(row)}")
                continue
            print(f"{row['op']:<12} {row['size']:>5} {row['seconds'] * 1e3:>9.3f} {row['tflops']:>8.1f} "
                  f"{_f(row.get('speedup_vs_bf16'), '.2f'):>7}  {row['path']}")
    elif name == "sqnr":
        print(f"{'scaling':<11} {'out':<9} {'path':<10} {'vs emu dB':>9} {'vs exact dB':>11} {'vs f64 dB':>9} "
              f"{'emu vs f64':>10}")
        for row in r["rows"]:
            if not row.get("ok"):
                print(f"{row['scaling']:<11} {_status(row)}")
                continue
            print(f"{row['scaling']:<11} {row['out_dtype']:<9} {row['path']:<10} "
                  f"{row['sqnr_vs_cpu_emulation_db']:>9.1f} {row['sqnr_vs_exact_f64_db']:>11.1f} "
                  f"{row['sqnr_vs_f64_db']:>9.1f} {row['cpu_emulation_sqnr_vs_f64_db']:>10.1f}")
    elif name == "casts":
        print(f"{'cast':<7} {'tokens x width':>15} {'eager ms':>9} {'fused ms':>9} {'x':>6} {'fused GB/s':>10}  bits")
        for row in r["rows"]:
            shape = f"{row['tokens']} x {row['width']}"
            if not row.get("ok"):
                print(f"{row['granularity']:<7} {shape:>15} {_status(row)}")
                continue
            print(f"{row['granularity']:<7} {shape:>15} {row['eager_ms']:>9.3f} {row['fused_ms']:>9.3f} "
                  f"{row['speedup']:>6.2f} {row['fused_gb_per_s']:>10.0f}  "
                  f"{'identical' if row['bit_identical'] else 'DIFFERENT'}")
    elif name == "fp8_linear":
        print(f"casts {'fused' if r.get('fused_casts') else 'eager'}")
        rows = r["rows"]
        if rows:
            print(f"per hidden size: {', '.join(rows[0]['shapes'])}; {rows[0]['tokens']} tokens x "
                  f"{rows[0]['micro_batches']} micro-batches, FP8 weight gradients")
        print(f"{'fwd+bwd':<20} {'size':>5} {'ms':>9} {'TFLOP/s':>8} {'x bf16':>7}")
        for row in r["rows"]:
            if not row.get("ok"):
                print(f"{row['layer']:<20} {row['in_features']:>5} {_status(row)}")
                continue
            print(f"{row['layer']:<20} {row['in_features']:>5} {row['seconds'] * 1e3:>9.3f} {row['tflops']:>8.1f} "
                  f"{_f(row.get('speedup_vs_bf16'), '.2f'):>7}")
        for recipe, width in r.get("fp8_min_features", {}).items():
            print(f"crossover {recipe:<10} " + (f"FP8 faster from width {width}: --fp8-min-features {width}"
                                                 if width else "FP8 slower at every width measured"))
    elif name == "step_audit":
        print(f"one step, {r['micro_batches']} micro-batches, casts {'fused' if r.get('fused_casts') else 'eager'}")
        print(f"{'level':<6} {'dispatched':>10} {'CUDA kernels':>12} {'syncs':>6} {'flagged':>8}")
        for level, row in r["levels"].items():
            if not row.get("ok"):
                print(f"{level:<6} {_status(row)}")
                continue
            print(f"{level:<6} {row['dispatched_launches']:>10} {_f(row['cuda_kernels'], 'd'):>12} "
                  f"{row['dispatched_syncs']:>6} {_f(row['flagged_syncs'], 'd'):>8}")
    elif name == "gpt":
        c = r["config"]
        print(f"GPT {c['num_layers']}L h{c['hidden_size']} ffn{c['ffn_hidden_size']} seq{c['seq_length']} "
              f"mb{c['micro_batch_size']} vocab{c['vocab_size']}")
        print(f"{'level':<6} {'params':>10} {'step ms':>9} {'tokens/s':>10} {'MFU %':>6} {'MFU bf16 %':>10} "
              f"{'peak GiB':>8} {'x none':>6} steps")
        for level, row in r["levels"].items():
            if not row.get("ok"):
                print(f"{level:<6} {_status(row)}")
                continue
            mem = row["peak_memory_bytes"]
            print(f"{level:<6} {row['num_params']:>10,} {row['step_time_s'] * 1e3:>9.1f} {row['tokens_per_s']:>10.0f} "
                  f"{_f(row['mfu_percent']):>6} {_f(row['mfu_vs_bf16_peak_percent']):>10} "
                  f"{_f(None if mem is None else mem / 2**30, '.1f'):>8} {_f(row.get('speedup_vs_none'), '.2f'):>6} "
                  f"{row['steps_run']}{' (cut)' if row['truncated_by_time_budget'] else ''}")


# ----- driver ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: tests the script itself")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS))
    parser.add_argument("--steps", type=int, default=None, help="GPT steps per level (default 12, dry 2)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every section's budget")
    parser.add_argument("--out", default=None, help="default bench/results/gpu_suite.json (-dryrun with --dry-run)")
    parser.add_argument("--fused-casts", default="auto", choices=fused.MODES,
                        help="FP8 casts in fp8_linear and gpt (fp8/fused.py); auto: fused on CUDA")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: no GPU is visible; use --dry-run (or --device cpu)", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    ctx = Ctx(device, args.dry_run, args.budget_scale)
    fused.set_mode(args.fused_casts)
    out = Path(args.out) if args.out else RESULTS / ("gpu_suite-dryrun.json" if args.dry_run else "gpu_suite.json")
    meta = run_meta("gpu_suite.py", argv, device=str(device), dry_run=args.dry_run, torch=torch.__version__,
                    budgets_s={k: v * args.budget_scale for k, v in BUDGETS.items()})
    runners = {"environment": section_environment, "gemm": section_gemm, "sqnr": section_sqnr, "casts": section_casts,
               "fp8_linear": section_fp8_linear,
               "step_audit": section_step_audit,
               "gpt": lambda c: section_gpt(c, tuple(args.levels), args.steps)}
    results: dict = {}
    t_all = time.monotonic()
    for name in [s for s in SECTIONS if s in args.sections]:
        budget = BUDGETS[name] * args.budget_scale
        ctx.start(budget)
        torch.manual_seed(0)
        t0 = time.monotonic()
        try:
            entry = {"ok": True, **runners[name](ctx)}
        except Exception as exc:  # noqa: BLE001 - one section's failure must not end the run
            entry = error_entry(exc)
        entry["seconds"] = round(time.monotonic() - t0, 2)
        entry["budget_s"] = budget
        entry["skipped_cases"] = _count_skipped(entry)
        results[name] = entry
        print_section(name, entry)
        if name == "fp8_linear" and entry.get("ok"):
            write_calibration(out, entry, device, args.dry_run)
        sys.stdout.flush()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            save_results(out, meta, results=_jsonable(results))
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    meta["wall_s"] = round(time.monotonic() - t_all, 1)
    save_results(out, meta, results=_jsonable(results))
    return 0


def write_calibration(out: Path, linear: dict, device: torch.device, dry: bool) -> Path:
    """fp8_calibration.json (-dryrun.json in a dry run) beside `out`: what --fp8-calibration reads."""
    cuda = device.type == "cuda"
    record = calibration_record(
        linear, device_name=torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        fused_casts=bool(linear.get("fused_casts")), torch_version=torch.__version__,
        capability=list(torch.cuda.get_device_capability(device)) if cuda else None)
    path = out.with_name("fp8_calibration" + ("-dryrun" if dry else "") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"calibration: {path} (--fp8-calibration {path})")
    return path


def _count_skipped(x) -> int:
    if isinstance(x, dict):
        return int(x.get("skipped") == "time budget") + sum(_count_skipped(v) for v in x.values())
    if isinstance(x, list):
        return sum(_count_skipped(v) for v in x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
