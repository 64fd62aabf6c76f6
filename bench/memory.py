"""Peak memory per phase of a training step at every precision level, on CPU (resident set) and,
where a GPU is present, on the GPU (`torch.cuda.max_memory_allocated`).

    python bench/memory.py                       # DP 1 and 2, levels none and O0-O3
    python bench/memory.py --dp 1 --levels none O3 --steps 2
    python bench/memory.py --mmap-threshold-mb 0  # glibc's adaptive default instead of the trainer's 4 MiB

The model is the one the memory issue measured: GPT, hidden 1024, 4 layers, vocabulary 512,
sequence 128, micro-batch 8, BF16 parameters (51M parameters, 50M of them in FP8 linears). Each
data-parallel rank is its own process (gloo on CPU). A step is split into its phases - forward,
backward, the gradient reduction (`finish_grad_sync`), the optimizer step (which publishes the
updated weights) - and each phase's peak is read with the peak reset at its start: on CPU by
clearing the kernel's high-water mark (``/proc/self/clear_refs``) and reading ``VmHWM``; the
figure is the resident set, so it includes what the allocator keeps: glibc's mmap threshold is
fixed as the trainer fixes it on CPU (`megatron.training.host_memory`), unless told otherwise. The step's peak is the
largest phase peak over `--steps` steps (the first step allocates the optimizer states).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, build_gpt_training, run_meta, save_results  # noqa: E402
from megatron.training.host_memory import DEFAULT_THRESHOLD_MB  # noqa: E402

LEVELS = ("none", "O0", "O1", "O2", "O3")
PHASES = ("forward", "backward", "reduction", "optimizer")
MODEL = dict(num_layers=4, hidden_size=1024, num_attention_heads=16, vocab_size=512, seq_length=128,
             micro_batch_size=8, ffn_hidden_size=4096)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakMeter:
    """Peak memory since `reset`: resident set (CPU) or allocated bytes (GPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from now

    def peak(self) -> int:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_kb("VmHWM") * 1024


def build(level: str, ps, device):
    from megatron.core.precision import FP8Config, plan_for

    fp8 = FP8Config(level=level, recipe="current")
    # FP8 ZeRO with several data-parallel ranks shards the dense states too, as the trainer does.
    use_dist_opt = plan_for(fp8).fp8_zero and ps.dp_size > 1
    # As the trainer: FP8 weights cast once per step, delayed-scaling updates after the step.
    model, ddp, optimizer, precision = build_gpt_training(MODEL, ps, device, fp8, lr=1e-4,
                                                          use_distributed_optimizer=use_dist_opt, once_per_step=True)
    return model, ddp, optimizer, precision


def measure(rank: int, world_size: int, level: str, steps: int, device_name: str, port: int,
            mmap_threshold_mb: float) -> dict:
    import torch
    import torch.distributed as dist

    from megatron.core.parallel_state import ParallelState
    from megatron.training.host_memory import configure_host_allocator

    allocator = configure_host_allocator(mmap_threshold_mb) if device_name == "cpu" else "CUDA caching allocator"

    if world_size > 1 or device_name == "cuda":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo" if device_name == "cpu" else "nccl", rank=rank, world_size=world_size)
    device = torch.device(device_name if device_name == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ps = ParallelState.build(1, 1, device=device) if dist.is_initialized() else ParallelState.single(device)
    torch.manual_seed(rank)
    model, ddp, optimizer, precision = build(level, ps, device)
    meter = PeakMeter(device)
    gen = torch.Generator().manual_seed(100 + rank)
    peaks = {phase: 0 for phase in PHASES}
    start_of_step, step_times = [], []
    for _ in range(steps):
        started = time.perf_counter()
        tokens = torch.randint(0, MODEL["vocab_size"], (MODEL["micro_batch_size"], MODEL["seq_length"] + 1),
                               generator=gen).to(device)
        ddp.zero_grad_buffer()
        meter.reset()
        start_of_step.append(meter.peak())
        loss = ddp(tokens[:, :-1], tokens[:, 1:]).float().mean()
        peaks["forward"] = max(peaks["forward"], meter.peak())
        meter.reset()
        loss.backward()
        del loss
        peaks["backward"] = max(peaks["backward"], meter.peak())
        meter.reset()
        ddp.finish_grad_sync()
        peaks["reduction"] = max(peaks["reduction"], meter.peak())
        meter.reset()
        optimizer.step()
        precision.end_step()
        peaks["optimizer"] = max(peaks["optimizer"], meter.peak())
        step_times.append(time.perf_counter() - started)
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"level": level, "dp": world_size, "rank": rank, "device": device_name, "allocator": allocator, "peaks": peaks,
            "step_peak": max(peaks.values()), "between_steps": start_of_step[-1],
            # after the first step (which allocates the optimizer's states); meter reads included
            "step_s": sum(step_times[1:]) / max(1, len(step_times) - 1)}


def _worker(rank, world_size, level, steps, device_name, port, mmap_threshold_mb, queue):
    queue.put(measure(rank, world_size, level, steps, device_name, port, mmap_threshold_mb))


def run(level: str, dp: int, steps: int, device_name: str, port: int, mmap_threshold_mb: float) -> list[dict]:
    """One fresh process per rank (so no run inherits another's allocations)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, dp, level, steps, device_name, port, mmap_threshold_mb, queue)) for r in range(dp)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank of {level} DP {dp} exited with {p.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--dp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mmap-threshold-mb", type=float, default=DEFAULT_THRESHOLD_MB,
                        help="glibc's mmap threshold on CPU, as the trainer's --malloc-mmap-threshold-mb sets it "
                             "(0: glibc's adaptive default)")
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = parser.parse_args(argv)
    rows, port = [], 29611
    for dp in args.dp:
        for level in args.levels:
            port += 1
            rows += run(level, dp, args.steps, args.device, port, args.mmap_threshold_mb)
    unit = "MB"
    print(f"\npeak memory of rank 0 per phase ({'resident set' if args.device == 'cpu' else 'GPU allocated'}, {unit}); "
          f"{rows[0]['allocator']}")
    print(f"{'DP':>3} {'level':<6}" + "".join(f"{p:>11}" for p in PHASES) + f"{'step':>11}{'vs none':>9}{'between':>11}{'step s':>9}")
    for dp in args.dp:
        base = next((r["step_peak"] for r in rows if r["dp"] == dp and r["rank"] == 0 and r["level"] == "none"), None)
        for r in (r for r in rows if r["dp"] == dp and r["rank"] == 0):
            ratio = f"{r['step_peak'] / base:9.2f}" if base else f"{'-':>9}"
            print(f"{dp:>3} {r['level']:<6}" + "".join(f"{r['peaks'][p] / 2**20:11.0f}" for p in PHASES)
                  + f"{r['step_peak'] / 2**20:11.0f}{ratio}{r['between_steps'] / 2**20:11.0f}{r['step_s']:9.2f}")
    save_results(args.out, run_meta("memory.py", argv, model=MODEL, steps=args.steps, device=args.device), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
