"""One-shot device check: FP8 GEMM paths and their accuracy, GEMM speed, FP8Linear, a small GPT
trained at every precision level, and the FP8 collectives on NCCL, on whatever GPU it is given.

    python bench/gpu_check.py                       # on the GPU, about 2-4 minutes on an H200
    python bench/gpu_check.py --quick --device cpu  # tiny sizes: tests the script itself

Sections (each runs on its own: a failing one records its exception and the run goes on):
environment, gemm_correctness, gemm_speed, fp8_linear, nccl, training. The JSON (default
$OUT/gpu_check-<device>.json when OUT is set, else docs/benchmarks/gpu_check-<device>-<date>.json)
is rewritten after every section, so a run cut short keeps what it measured. Nothing is asserted:
the numbers are recorded and a short table is printed at the end. Only project code and torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import fp8  # noqa: E402
import fp8.linear  # noqa: E402
from bench.common import build_gpt_training, run_meta, save_results  # noqa: E402
from bench.gpu_report import print_summary  # noqa: E402
from fp8.collectives import fp8_all_reduce, fp8_reduce_to_owners  # noqa: E402
from fp8.gemm import device_info, emulated_matmul, fp8_matmul, select_path  # noqa: E402
from fp8.scaling import expand_tiles  # noqa: E402
from fp8.tensor import ScalingTensor, quantize  # noqa: E402

SECTIONS = ("environment", "gemm_correctness", "gemm_speed", "fp8_linear", "nccl", "training")
LEVELS = ("none", "O0", "O1", "O2", "O3")


class Ctx:
    def __init__(self, args):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.quick = args.quick
        self.deadline = time.monotonic() + args.time_budget
        self.args = args

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def error_entry(exc: BaseException) -> dict:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}


def guarded(ctx: Ctx, fn, *a, **kw) -> dict:
    """fn(...) as a dict with ok=True, or the exception recorded; async CUDA errors are caught
    here too (the synchronize), so they land on the case that caused them."""
    try:
        out = fn(*a, **kw)
        ctx.sync()
        return {"ok": True, **out}
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        return error_entry(exc)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double().to(out.device)
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom > 0 else float("nan")


def median_seconds(ctx: Ctx, fn, reps: int, warmup: int) -> float:
    """Median wall time of one call; on CUDA with events, synchronised around every call."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    samples = []
    for _ in range(reps):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


@contextlib.contextmanager
def record_gemm_paths(log: list):
    """Wraps fp8.linear's fp8_matmul (in this process only) to log the path each call takes."""
    original = fp8.linear.fp8_matmul

    def recording(a, b, out_dtype=torch.float32, bias=None, *, path="auto", fast_accum=False):
        chosen, reason = select_path(a, b, out_dtype, device_info(a.device)) if path == "auto" else (path, "forced")
        log.append({"shape": [a.shape[0], a.shape[1], b.shape[1]], "fmt": f"{a.fmt}x{b.fmt}",
                    "out_dtype": str(out_dtype).replace("torch.", ""), "path": chosen, "reason": reason})
        return original(a, b, out_dtype, bias, path=path, fast_accum=fast_accum)

    fp8.linear.fp8_matmul = recording
    try:
        yield log
    finally:
        fp8.linear.fp8_matmul = original


# ----- 1. environment ----------------------------------------------------------------------------
def section_environment(ctx: Ctx) -> dict:
    info = device_info(ctx.device)
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "has_scaled_mm": hasattr(torch, "_scaled_mm"),
           "has_F_scaled_mm": hasattr(F, "scaled_mm"),
           "has_blockwise_scaling_type": hasattr(getattr(F, "ScalingType", None), "BlockWise1x128"),
           "device_info": {k: getattr(info, k) for k in info.__dataclass_fields__},
           "git_commit": _git_commit()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(device_name=props.name, capability=list(torch.cuda.get_device_capability(ctx.device)),
                   total_memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version(), allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        with contextlib.suppress(Exception):
            out["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    else:
        out.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return out


def _git_commit() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    return None


# ----- 2. GEMM correctness -----------------------------------------------------------------------
def exact_value(x: ScalingTensor) -> torch.Tensor:
    """The FP8 operand's value in float64: payload times the fp32 reciprocal scale the kernels get."""
    data = x.data.double()
    inv = x.scale_inv().double()
    if x.tile is None:
        return data * inv
    if x.data.is_contiguous():
        return data * expand_tiles(inv, tuple(x.shape), x.tile)
    # A transposed view (b = w.t()): expand in the stored orientation, then transpose back.
    xt = x.t()
    return (xt.data.double() * expand_tiles(xt.scale_inv().double(), tuple(xt.shape), xt.tile)).t()


def make_operands(m: int, k: int, n: int, fmt_a: str, fmt_b: str, scaling: str, device):
    """a (M, K) like an activation / output gradient, b (K, N) = a weight (N, K) transposed, as
    FP8Linear builds them: 'tensor', 'row', 'block' (1x128 x 128x128) or 'block1x128' (1x128 x 1x128)."""
    gen = torch.Generator(device="cpu").manual_seed(1000 * m + 10 * k + n)
    a_hp = torch.randn(m, k, generator=gen) * (1e-3 if fmt_a == "e5m2" else 1.0)
    # Some rows / columns much larger, so per-row and per-block scales matter.
    a_hp[:: max(1, m // 7)] *= 30.0
    w_hp = torch.randn(n, k, generator=gen) * 0.02
    w_hp[:, :: max(1, k // 5)] *= 10.0
    a_hp, w_hp = a_hp.to(device), w_hp.to(device)
    pow2 = scaling != "tensor"
    gran_a = {"tensor": "tensor", "row": "row"}.get(scaling, "block")
    a = quantize(a_hp, fmt_a, granularity=gran_a, power_of_two=pow2)
    if scaling == "block1x128":
        w = quantize(w_hp, fmt_b, granularity="block", role="activation", power_of_two=pow2)
    else:
        w = quantize(w_hp, fmt_b, granularity=gran_a, role="weight", power_of_two=pow2)
    return a, w.t()


def gemm_case(ctx: Ctx, m, k, n, fmt_a, fmt_b, scaling, out_dtypes) -> list[dict]:
    a, b = make_operands(m, k, n, fmt_a, fmt_b, scaling, ctx.device)
    ref64 = exact_value(a) @ exact_value(b)
    emu_cpu32 = emulated_matmul(a.to("cpu"), b.to("cpu"), torch.float32)
    rows = []
    for out_dtype in out_dtypes:
        path, reason = select_path(a, b, out_dtype, device_info(ctx.device))
        row = {"shape": [m, k, n], "fmt": f"{fmt_a}x{fmt_b}", "scaling": scaling,
               "out_dtype": str(out_dtype).replace("torch.", ""), "path": path, "reason": reason}

        def measure():
            out = fp8_matmul(a, b, out_dtype)
            emu_dev = fp8_matmul(a, b, out_dtype, path="emulate")
            emu_cpu = emu_cpu32.to(out_dtype)
            return {"rel_err_vs_f64": rel_err(out, ref64), "rel_err_vs_cpu_emulation": rel_err(out, emu_cpu),
                    "max_abs_diff_vs_cpu_emulation": (out.double().cpu() - emu_cpu.double()).abs().max().item(),
                    "rel_err_vs_device_emulation": rel_err(out, emu_dev),
                    "cpu_emulation_rel_err_vs_f64": rel_err(emu_cpu, ref64.cpu()),
                    "finite": bool(torch.isfinite(out).all().item())}

        row.update(guarded(ctx, measure))
        if path != "emulate" and row["ok"]:
            # the same native call with fast accumulation (what forward GEMMs use)
            fast = guarded(ctx, lambda: {"rel_err_vs_f64": rel_err(
                fp8_matmul(a, b, out_dtype, fast_accum=True), ref64)})
            row["fast_accum_rel_err_vs_f64"] = fast.get("rel_err_vs_f64", fast.get("error"))
        rows.append(row)
    return rows


def section_gemm_correctness(ctx: Ctx) -> dict:
    if ctx.quick:
        shapes = [(64, 512, 128), (30, 50, 40)]
    else:
        # M not a multiple of 16 (1000), 4 (3) or just 1 (decoding one token) still goes native;
        # K = 1000 cannot (the emulation fallback).
        shapes = [(256, 512, 1024), (1000, 1024, 2048), (3, 512, 256), (1, 512, 256), (4096, 4096, 4096),
                  (250, 1000, 520)]
    cases = []
    for m, k, n in shapes:
        for fmt_a, fmt_b in (("e4m3", "e4m3"), ("e5m2", "e4m3")):
            for scaling in ("tensor", "row", "block", "block1x128"):
                out_dtypes = (torch.float32, torch.bfloat16) if scaling == "tensor" else (torch.bfloat16,)
                if ctx.time_left() < 60:
                    cases.append({"shape": [m, k, n], "fmt": f"{fmt_a}x{fmt_b}", "scaling": scaling,
                                  "ok": False, "error": "skipped: time budget"})
                    continue
                try:
                    cases += gemm_case(ctx, m, k, n, fmt_a, fmt_b, scaling, out_dtypes)
                except Exception as exc:  # noqa: BLE001 - building the operands failed
                    cases.append({"shape": [m, k, n], "fmt": f"{fmt_a}x{fmt_b}", "scaling": scaling,
                                  **error_entry(exc)})
                gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    paths = Counter(c.get("path", "error") for c in cases)
    return {"cases": cases, "paths": dict(paths), "failed": sum(not c["ok"] for c in cases)}


# ----- 3. GEMM speed -----------------------------------------------------------------------------
def section_gemm_speed(ctx: Ctx) -> dict:
    if ctx.cuda:
        sizes = [1024] if ctx.quick else [4096, 8192]
    else:
        sizes = [128] if ctx.quick else [512, 1024]
    reps, warmup = (3, 1) if ctx.quick else (20, 5)
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        x = torch.randn(size, size, device=ctx.device, dtype=torch.bfloat16)
        w = torch.randn(size, size, device=ctx.device, dtype=torch.bfloat16) * 0.02
        x_fp8, w_fp8 = quantize(x, "e4m3"), quantize(w, "e4m3")
        x_row = quantize(x, "e4m3", granularity="row", power_of_two=True)
        w_row = quantize(w, "e4m3", granularity="row", role="weight", power_of_two=True)
        x_blk = quantize(x, "e4m3", granularity="block", power_of_two=True)
        w_blk = quantize(w, "e4m3", granularity="block", role="weight", power_of_two=True)
        sa, sb = x_fp8.scale_inv(), w_fp8.scale_inv()
        fast = ctx.cuda
        bf16 = torch.bfloat16
        candidates = [  # (name, call, the FP8 operands whose path select_path reports)
            ("bf16 torch.matmul", lambda: torch.matmul(x, w.t()), None),
            ("raw torch._scaled_mm per-tensor" + (" fast_accum" if fast else ""), lambda: torch._scaled_mm(
                x_fp8.data, w_fp8.data.t(), scale_a=sa, scale_b=sb, out_dtype=bf16, use_fast_accum=fast), None),
            ("fp8_matmul per-tensor", lambda: fp8_matmul(x_fp8, w_fp8.t(), bf16), (x_fp8, w_fp8)),
            ("fp8_matmul per-tensor fast_accum", lambda: fp8_matmul(x_fp8, w_fp8.t(), bf16, fast_accum=True),
             (x_fp8, w_fp8)),
            ("quantize x,w + fp8_matmul per-tensor fast_accum", lambda: fp8_matmul(
                quantize(x, "e4m3"), quantize(w, "e4m3").t(), bf16, fast_accum=True), (x_fp8, w_fp8)),
            ("fp8_matmul rowwise fast_accum", lambda: fp8_matmul(x_row, w_row.t(), bf16, fast_accum=True),
             (x_row, w_row)),
            ("fp8_matmul blockwise", lambda: fp8_matmul(x_blk, w_blk.t(), bf16), (x_blk, w_blk)),
        ]
        for name, fn, operands in candidates:
            row = {"op": name, "size": size}
            if operands is not None:
                row["path"], row["reason"] = select_path(operands[0], operands[1].t(), bf16, device_info(ctx.device))
            row.update(guarded(ctx, lambda: {"seconds": median_seconds(ctx, fn, reps, warmup)}))
            if row["ok"]:
                row["tflops"] = 2 * size**3 / row["seconds"] / 1e12
            rows.append(row)
        del x, w, x_fp8, w_fp8, x_row, w_row, x_blk, w_blk
        if ctx.cuda:
            torch.cuda.empty_cache()
    return {"rows": rows, "reps": reps, "warmup": warmup}


# ----- 4. FP8Linear --------------------------------------------------------------------------------
def linear_case(ctx: Ctx, recipe: str, fmt: str, dtype: torch.dtype, tokens: int, in_f: int, out_f: int,
                iters: int) -> dict:
    torch.manual_seed(1)
    layer = fp8.FP8Linear(in_f, out_f, bias=True, recipe=fp8.Recipe(recipe=recipe, fmt=fmt), device=ctx.device,
                          dtype=dtype)
    x = torch.randn(tokens, in_f, device=ctx.device, dtype=dtype).requires_grad_(True)
    dy = (torch.randn(tokens, out_f, device=ctx.device) * 1e-3).to(dtype)
    paths: list = []
    per_iter = []
    for i in range(iters):
        x.grad, layer.weight.grad, layer.bias.grad = None, None, None
        log: list = []
        with record_gemm_paths(log):
            y = layer(x)
            y.backward(dy)
        ctx.sync()
        paths = log
        w64, b64, x64, dy64 = layer.weight.double(), layer.bias.double(), x.detach().double(), dy.double()
        per_iter.append({"out": rel_err(y.detach(), x64 @ w64.t() + b64), "dgrad": rel_err(x.grad, dy64 @ w64),
                         "wgrad": rel_err(layer.weight.grad, dy64.t() @ x64)})
    roles = ["fprop", "dgrad", "wgrad"]
    return {"shape": [tokens, in_f, out_f],
            "use_fp8": layer.use_fp8, "rel_err": per_iter[-1], "rel_err_first_iter": per_iter[0],
            "paths": {role: p for role, p in zip(roles, paths)}}


def section_fp8_linear(ctx: Ctx) -> dict:
    tokens, in_f, out_f = (64, 128, 256) if ctx.quick else (4096, 1024, 4096)
    cases = []
    # Per-tensor delayed / current are the point; rowwise and blockwise (and blockwise with E4M3
    # gradients, so that dgrad can use the block kernel too) show which GEMMs go native.
    recipes = [("delayed", "hybrid"), ("current", "hybrid"), ("rowwise", "hybrid"), ("blockwise", "hybrid"),
               ("blockwise", "e4m3")]
    for dtype in (torch.float32, torch.bfloat16):
        for recipe, fmt in recipes:
            row = {"recipe": recipe, "fmt": fmt, "dtype": str(dtype).replace("torch.", "")}
            row.update(guarded(ctx, linear_case, ctx, recipe, fmt, dtype, tokens, in_f, out_f, 3))
            cases.append(row)
    return {"cases": cases, "failed": sum(not c["ok"] for c in cases)}


# ----- 6. NCCL (run before training, so the time budget cannot skip it) ---------------------------
def _collective_checks(ctx: Ctx, transport) -> dict:
    torch.manual_seed(3)
    shapes = [(256, 128), (1000,), (64, 48)]
    grads = [quantize(torch.randn(*s, device=ctx.device) * 1e-3, "e4m3") for s in shapes]
    owners = [0] * len(grads)
    return {"fp8_all_reduce": guarded(ctx, lambda: _compare(fp8_all_reduce(grads, transport).tensors, grads)),
            "fp8_reduce_to_owners": guarded(
                ctx, lambda: _compare(fp8_reduce_to_owners(grads, owners, transport).tensors, grads))}


def _compare(results, grads) -> dict:
    """At world size 1 the mean is the input itself: the dequantized values must match exactly."""
    diffs = [(r.dequantize() - g.dequantize()).abs().max().item() for r, g in zip(results, grads)]
    devices = sorted({str(r.data.device) for r in results})
    return {"max_abs_diff": max(diffs), "exact": max(diffs) == 0.0, "result_devices": devices}


def section_nccl(ctx: Ctx) -> dict:
    import torch.distributed as dist
    backend = "nccl" if ctx.cuda else "gloo"
    if dist.is_initialized():
        return {"backend": backend, "note": "a process group already exists; left alone"}
    out: dict = {"backend": backend, "world_size": 1}
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"device_id": ctx.device} if ctx.cuda else {}
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", world_size=1, rank=0,
                                timeout=datetime.timedelta(seconds=60), **kw)
        try:
            out["process_group_transport"] = _collective_checks(ctx, fp8.ProcessGroupTransport())
            out["forced_collectives"] = _collective_checks(ctx, fp8.ProcessGroupTransport(always_call=True))

            def raw():
                t = torch.arange(4, dtype=torch.float64, device=ctx.device)
                dist.all_reduce(t, op=dist.ReduceOp.MIN)
                b = torch.arange(32, dtype=torch.uint8, device=ctx.device)
                recv = torch.empty_like(b)
                dist.all_to_all_single(recv, b, [32], [32])
                parts = [torch.empty_like(b)]
                dist.all_gather(parts, b)
                return {"all_reduce_f64": t.tolist() == [0.0, 1.0, 2.0, 3.0],
                        "all_to_all_uint8": torch.equal(recv, b), "all_gather_uint8": torch.equal(parts[0], b)}

            out["raw_collectives"] = guarded(ctx, raw)
        finally:
            dist.destroy_process_group()
    checks = [out["process_group_transport"][k] for k in ("fp8_all_reduce", "fp8_reduce_to_owners")]
    checks += [out["forced_collectives"][k] for k in ("fp8_all_reduce", "fp8_reduce_to_owners")]
    checks.append(out["raw_collectives"])
    out["all_ok"] = all(c["ok"] for c in checks)
    return out


# ----- 5. training ---------------------------------------------------------------------------------
def train_config(ctx: Ctx) -> dict:
    if ctx.quick:
        return dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, vocab_size=128,
                    seq_length=32, micro_batch_size=2, steps=ctx.args.steps or 3, min_features=64,
                    lr=ctx.args.lr, warmup=ctx.args.warmup)
    return dict(num_layers=4, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096, vocab_size=4096,
                seq_length=512, micro_batch_size=8, steps=ctx.args.steps or 100, min_features=128,
                lr=ctx.args.lr, warmup=ctx.args.warmup)


def synthetic_batches(cfg: dict, seed: int = 1234) -> list[torch.Tensor]:
    """Token batches with a learnable signal: only an eighth of the vocabulary occurs (quick to
    learn), and each token is followed by its fixed random successor 90% of the time (else by a
    random token of that eighth), so the loss falls well below log(vocab) within a few steps."""
    gen = torch.Generator().manual_seed(seed)
    vocab, seq, batch, steps = cfg["vocab_size"], cfg["seq_length"], cfg["micro_batch_size"], cfg["steps"]
    active = torch.randperm(vocab, generator=gen)[: max(2, vocab // 8)]
    successor = torch.randperm(active.numel(), generator=gen)  # index -> index within `active`
    rows = steps * batch
    index = torch.empty(rows, seq + 1, dtype=torch.int64)
    index[:, 0] = torch.randint(0, active.numel(), (rows,), generator=gen)
    noise = torch.rand(rows, seq, generator=gen) < 0.1
    random_index = torch.randint(0, active.numel(), (rows, seq), generator=gen)
    for i in range(seq):
        index[:, i + 1] = torch.where(noise[:, i], random_index[:, i], successor[index[:, i]])
    return list(active[index].split(batch))


def build_level(ctx: Ctx, cfg: dict, variant: str):
    """As tests/test_fp8_level_o3.py's build(), single process, BF16 parameters (like --bf16).
    `variant` is a level, or LEVEL@RECIPE for another --fp8-recipe than the default (delayed)."""
    level, _, recipe = variant.partition("@")
    from megatron.core.parallel_state import ParallelState
    from megatron.core.precision import FP8Config

    ps = ParallelState.single(ctx.device)
    fp8_config = FP8Config(level=level, min_features=cfg["min_features"], recipe=recipe or "delayed")
    model, ddp, optimizer, precision = build_gpt_training(cfg, ps, ctx.device, fp8_config, lr=cfg["lr"])
    switched = list(precision.fp8_linears)
    return model, ddp, optimizer, switched


def train_level(ctx: Ctx, cfg: dict, level: str, batches: list[torch.Tensor]) -> dict:
    from megatron.training.training import memory_record

    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    model, ddp, optimizer, switched = build_level(ctx, cfg, level)
    num_params = sum(p.numel() for p in model.parameters())
    losses, times, skipped, grad_norms, paths = [], [], 0, [], []
    truncated = False
    for step, tokens in enumerate(batches):
        if step >= 5 and ctx.time_left() < 10:
            truncated = True
            break
        tokens = tokens.to(ctx.device)
        ctx.sync()
        t0 = time.perf_counter()
        log: list = []
        with record_gemm_paths(log) if step == 0 else contextlib.nullcontext():
            for group in optimizer.param_groups:  # linear warm-up, then constant
                group["lr"] = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"])
            ddp.zero_grad_buffer()
            loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean()
            loss.backward()
            ddp.finish_grad_sync()
            result = optimizer.step()
        loss_value = loss.item()
        ctx.sync()
        times.append(time.perf_counter() - t0)
        if step == 0:
            paths = sorted(Counter((e["path"], e["fmt"], e["reason"]) for e in log).items())
        losses.append(loss_value)
        skipped += int(result.skipped)
        grad_norms.append(float(result.grad_norm))
    steady = times[2:] if len(times) > 4 else times[1:] or times
    step_time = sorted(steady)[len(steady) // 2]
    tokens_per_step = cfg["micro_batch_size"] * cfg["seq_length"]
    out = {"truncated_by_time_budget": truncated, "losses": losses,
           "last5_mean": sum(losses[-5:]) / len(losses[-5:]), "last20_mean": sum(losses[-20:]) / len(losses[-20:]),
           "skipped": skipped,
           "grad_norm_last": grad_norms[-1], "step_times_s": times, "median_step_s": step_time,
           "tokens_per_s": tokens_per_step / step_time, "num_params": num_params, "fp8_layers": len(switched),
           "memory_record": memory_record(model, ddp, optimizer, num_params),
           "fp8_stats": dict(getattr(ddp, "fp8_stats", {}) or {}),
           "gemm_paths_step0": [{"path": p, "fmt": f, "reason": r, "calls": c} for (p, f, r), c in paths]}
    if ctx.cuda:
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated(ctx.device)
    del model, ddp, optimizer
    return out


def section_training(ctx: Ctx) -> dict:
    cfg = train_config(ctx)
    batches = synthetic_batches(cfg)
    levels = ctx.args.levels
    out: dict = {"config": cfg, "levels": {}}
    for level in levels:
        if ctx.time_left() < 20:
            out["levels"][level] = {"ok": False, "error": "skipped: time budget"}
            continue
        out["levels"][level] = guarded(ctx, train_level, ctx, cfg, level, batches)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    base = out["levels"].get("none", {})
    if base.get("ok"):
        for level, r in out["levels"].items():
            if r.get("ok") and level != "none":
                r["last5_minus_none"] = r["last5_mean"] - base["last5_mean"]
                r["last20_rel_vs_none"] = r["last20_mean"] / base["last20_mean"] - 1
                r["max_abs_loss_diff_vs_none"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
    return out


# ----- driver ----------------------------------------------------------------------------------
RUNNERS = {"environment": section_environment, "gemm_correctness": section_gemm_correctness,
           "gemm_speed": section_gemm_speed, "fp8_linear": section_fp8_linear, "nccl": section_nccl,
           "training": section_training}


def default_out(device: torch.device) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / f"gpu_check-{device.type}.json"
    return REPO / "docs" / "benchmarks" / f"gpu_check-{device.type}-{datetime.date.today().isoformat()}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 training steps (tests the script)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS) + ["O0@current", "O2@current"],
                        help="levels to train, LEVEL@RECIPE for another --fp8-recipe")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=20, help="linear LR warm-up steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps per level (default 20, quick 3)")
    parser.add_argument("--time-budget", type=float, default=330.0,
                        help="seconds; later GEMM cases and training levels are skipped past it")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    ctx = Ctx(args)
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    out_path = Path(args.out) if args.out else default_out(ctx.device)
    meta = run_meta("gpu_check.py", argv, device=str(ctx.device), quick=args.quick, torch=torch.__version__)
    results: dict = {}
    for name in [s for s in SECTIONS if s in args.sections]:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        t0 = time.monotonic()
        torch.manual_seed(0)
        try:
            entry = {"ok": True, **RUNNERS[name](ctx)}
        except Exception as exc:  # noqa: BLE001 - one section's failure must not end the run
            entry = error_entry(exc)
        entry["seconds"] = round(time.monotonic() - t0, 2)
        results[name] = entry
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {'ok' if entry['ok'] else 'FAILED: ' + entry['error'][:200]}"
              f" ({entry['seconds']} s)", flush=True)
        with contextlib.suppress(Exception):
            _save(out_path, meta, results, quiet=True)
    print_summary(results)
    _save(out_path, meta, results)
    return 0


def _save(out_path: Path, meta: dict, results: dict, quiet: bool = False) -> None:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
        save_results(out_path, meta, results=_jsonable(results))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
