"""What one training step asks of a GPU, counted on the CPU: kernel-launching operations, host
syncs, tensors made from host data, and collectives with the bytes handed to torch.distributed,
per precision level beside `none`.

    python bench/launch_audit.py --config configs/gpt-tiny.yaml --levels none,O2,O3 --world-size 2
    python bench/launch_audit.py --levels none,O3 --world-size 8 --json out.json -- --hidden-size 256

One process runs the real trainer (pretrain_gpt.py's task on the built-in corpus) at rank 0 of a
world of `--world-size` ranks; above 1 the ranks are torch's fake process group, so any
data-parallel (and tensor- or pipeline-parallel) layout runs one rank's code path without the other
ranks (their collectives return at once, with this rank's values). A first step warms up (fused
casts compile, buffers are allocated); the second is counted:

- `launches`: every ATen operation that reaches a kernel (TorchDispatchMode, below autograd), except
  views, metadata and allocations, which launch nothing on a GPU. With `--fused-casts` (the
  trainer's `--fp8-fused-casts on`, what a CUDA run with Triton takes by default) each compiled
  FP8 cast counts as the kernels Inductor generates for it, compiled once per variant for this
  machine's CPU (`fused_kernels`; a GPU's Triton code may split a large reduction in two), and
  its operations run uncounted. On CPU the data loader's and the console's own operations happen
  outside the counted region (the step's micro-batches are read before it).
- `host_syncs`: operations whose result the host waits for (`.item()`, `.tolist()`, `nonzero`,
  `equal`, `is_nonzero`): each a device-to-host copy and a stream sync on a GPU. Reads of
  torch.optim's step counts, which a CUDA run keeps on the host, are `host_reads` instead.
- `scalar_to_device`: tensors made from Python data inside the step (`lift_fresh`): on a GPU, a
  host-to-device copy.
- `collectives` and `collective_bytes`: the calls into torch.distributed and the bytes of the
  tensors handed to them (the input of a reduction or an all-to-all, the local part of a gather,
  what a rank sends), for one rank.

torch's AdamW (the dense parameters' optimizer) is built with ``foreach=True``, the multi-tensor
path torch picks for CUDA parameters (on CPU it would loop over the tensors one by one), and each
FP8 GEMM is one call, as on a GPU (the CPU emulation otherwise splits large products into blocks);
the FP8 chunk is CUDA's (`--fp8-chunk-mb 256` unless the flags after ``--`` set one).
Operations run by another thread (`--overlap-grad-reduce`'s communication thread) are not seen;
the audit runs without the overlap flags. The counts come from a real step on this machine's CPU
kernels, or with `--device meta` from a step on tensors without data (any model size: FP8 GEMMs,
FP8AdamW and attention take an H100's paths, host reads see stand-in values): a CUDA build
dispatches the same ATen operations, but cuBLAS, Triton and NCCL may split or merge kernels below
them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from fp8.scaling import CUDA_CHUNK_MB  # noqa: E402

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item"})
HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})
# Neither a view nor a kernel: allocation and tensor metadata.
NO_KERNEL_OPS = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
                           "set_", "resize_", "_to_copy_noop", "lift", "sym_size", "sym_stride", "sym_numel",
                           "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"})
GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"})
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "broadcast", "send", "recv", "isend", "irecv",
               "batch_isend_irecv", "barrier", "reduce", "gather", "scatter")


def op_kind(func) -> str:
    """"sync", "host_data", "none" (a view, metadata or an allocation) or "launch"."""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return "sync"
    if name in HOST_DATA_OPS:
        return "host_data"
    if name in NO_KERNEL_OPS or getattr(func, "is_view", False):
        return "none"
    return "launch"


class OpCounter(TorchDispatchMode):
    """Every ATen operation dispatched in this thread while active, by name and by kind. Reads of
    `host_tensors` (tensors a CUDA run keeps in host memory: torch.optim's step counts) are
    "host_read", not syncs."""

    def __init__(self, host_tensors: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.host_ids = {id(t) for t in host_tensors}
        self.paused = False  # operations that stand for a compiled kernel counted on its own

    # The counters in use, innermost last (`fused_kernels` adds a compiled cast's kernels to it).
    active: list[OpCounter] = []

    def __enter__(self):
        OpCounter.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        OpCounter.active.remove(self)
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def suspended(self):
        """This counter off the dispatch stack for a while (it must be the innermost mode):
        what runs meanwhile is neither counted nor seen."""
        super().__exit__(None, None, None)
        try:
            yield
        finally:
            super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        self.ops[str(func)] += 1
        kind = op_kind(func)
        if kind == "sync" and args and id(args[0]) in self.host_ids:
            kind = "host_read"
        self.kinds[kind] += 1
        if kind == "sync" and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return meta_value(func, args[0])
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def host_copies(self):
        """`.tolist()` and `.numpy()` counted as syncs too: on a GPU each is a device-to-host copy
        and a stream sync, on the CPU they dispatch nothing. On the meta device they give zeros."""
        saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def counted(name):
            def read(tensor, *args, **kwargs):
                kind = "host_read" if id(tensor) in self.host_ids else "sync"
                self.ops[f"Tensor.{name}"] += 1
                self.kinds[kind] += 1
                if tensor.is_meta:
                    zeros = torch.zeros(tensor.shape, dtype=torch.float64 if tensor.is_floating_point() else torch.int64)
                    return saved[name](zeros, *args, **kwargs)
                return saved[name](tensor, *args, **kwargs)
            return read

        for name in saved:
            setattr(torch.Tensor, name, counted(name))
        try:
            yield self
        finally:
            for name, original in saved.items():
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def fused_kernels():
    """Compiled FP8 casts (`fp8.fused.compiled`) counted as the kernels Inductor generates for
    them: each variant (function, flags, operand dtypes and ranks) compiled afresh once for this
    machine's CPU on zeros of the call's shapes, outside any count, its kernels counted in the
    generated code (`compiled_kernels`); every call then runs the function's operations eagerly
    (on the meta device nothing compiles), uncounted, and adds that many launches to the counter
    in use."""
    from fp8 import fused

    original, kernels = fused.compiled, {}

    def compiled(fn):
        def call(*args):
            key = (fn.__name__, *((a.dtype, a.dim()) if isinstance(a, torch.Tensor) else a for a in args))
            counter = OpCounter.active[-1] if OpCounter.active else None
            if key not in kernels:
                with counter.suspended() if counter is not None else contextlib.nullcontext():
                    example = [torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
                    kernels[key] = compiled_kernels(fn, example)
            if counter is None:
                return fn(*args)
            counter.paused = True
            try:
                out = fn(*args)
            finally:
                counter.paused = False
            counter.ops[f"compiled.{fn.__name__}"] += kernels[key]
            counter.kinds["launch"] += kernels[key]
            return out
        return call

    fused.compiled = compiled
    try:
        yield kernels
    finally:
        fused.compiled = original


def compiled_kernels(fn, args: list) -> int:
    """Kernels in the code Inductor generates for ``fn(*args)`` (dynamic shapes, one graph), on
    the arguments' device: each is defined once in the output code (``async_compile.cpp_pybinding``
    on the CPU, ``async_compile.triton`` on CUDA). Dynamo's caches are reset first, so that an
    earlier compilation of `fn` cannot hide the code."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(fn, dynamic=True, fullgraph=True), *args)
    return sum(len(re.findall(r"= async_compile\.(?:cpp_pybinding|cpp|triton)\(", source)) for source in code)


def meta_value(func, tensor: torch.Tensor):
    """What a host read of a meta tensor stands in for: False for a test, 1 for a number (a finite
    loss or gradient norm, so that the step is not skipped)."""
    if func.overloadpacket.__name__ in ("is_nonzero", "equal") or tensor.dtype == torch.bool:
        return False
    if func.overloadpacket.__name__ == "nonzero":
        return torch.zeros((0, tensor.dim()), dtype=torch.int64, device="meta")
    return 1.0 if tensor.is_floating_point() else 1


def host_step_counts(optimizer) -> list[torch.Tensor]:
    """torch.optim's per-parameter step counts anywhere in `optimizer` (a chained one included):
    on CUDA torch keeps them on the host (unless capturable or fused), so reading them syncs nothing."""
    found, stack = [], [optimizer]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.optim.Optimizer):
            found += [s["step"] for s in item.state.values() if isinstance(s.get("step"), torch.Tensor)]
        stack += [getattr(item, name) for name in ("optimizer", "parts", "inner", "dense") if hasattr(item, name)]
        if isinstance(item, (list, tuple)):
            stack += list(item)
    return found


@contextlib.contextmanager
def cuda_optimizer_defaults():
    """torch.optim.AdamW as torch builds it for CUDA parameters: the multi-tensor (foreach) path,
    which on CPU it takes only when asked."""
    original = torch.optim.AdamW.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("foreach", True)
        original(self, *args, **kwargs)

    torch.optim.AdamW.__init__ = init
    try:
        yield
    finally:
        torch.optim.AdamW.__init__ = original


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if hasattr(value, "tensor") and isinstance(getattr(value, "tensor"), torch.Tensor):  # P2POp
        return [value.tensor]
    return []


def _sent_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """The bytes of the tensors a rank hands over: what a reduction or gather puts in, what a
    send or an all-to-all gives away (the receive buffers are not counted)."""
    if name in ("all_gather", "gather"):
        return sum(t.nbytes for t in _tensors(args[1] if len(args) > 1 else kwargs.get("tensor")))
    if name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "all_to_all",
                "reduce_scatter"):
        return sum(t.nbytes for t in _tensors(args[1] if len(args) > 1 else kwargs.get("input_tensor",
                                                                                        kwargs.get("input"))))
    if name in ("recv", "irecv", "barrier"):
        return 0
    if name == "batch_isend_irecv":
        return sum(op.tensor.nbytes for op in args[0] if getattr(op.op, "__name__", "") == "isend")
    return sum(t.nbytes for t in _tensors(args[0] if args else kwargs.get("tensor")))


class CollectiveCounter:
    """Calls into torch.distributed's collectives (and the bytes handed to them) while active,
    from any thread."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.bytes = 0
        self._saved: dict = {}

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args, __name=name, __original=original, **kwargs):
                self.calls[__name] += 1
                self.bytes += _sent_bytes(__name, args, kwargs)
                return __original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()


def audit_step(trainer) -> dict:
    """One counted `train_step` of `trainer` (its micro-batches read before counting starts)."""
    read_step_batches(trainer)
    return count_step(trainer)


def read_step_batches(trainer) -> None:
    """The next step's micro-batches read now, so that the data loader's work stays uncounted."""
    batches = [next(trainer.train_iter) for _ in range(trainer.num_microbatches)]
    trainer.train_iter = iter(batches)


def count_step(trainer) -> dict:
    """`trainer.train_step()` counted (see the module docstring)."""
    trainer.ps.counter.reset()
    ops = OpCounter(host_step_counts(trainer.optimizer))
    with CollectiveCounter() as collectives, ops, ops.host_copies():
        _, skipped, _ = trainer.train_step()
    return {"launches": ops.kinds["launch"], "host_syncs": ops.kinds["sync"], "host_reads": ops.kinds["host_read"],
            "scalar_to_device": ops.kinds["host_data"], "collectives": sum(collectives.calls.values()),
            "collective_bytes": collectives.bytes, "skipped": bool(skipped),
            "dispatched": sum(ops.kinds.values()), "collectives_by_name": dict(collectives.calls),
            "gemms": sum(n for name, n in ops.ops.items() if name.split(".")[1] in GEMM_OPS),
            # The trainer's own per-group figures (ring cost model), for comparison.
            "comm_ring_bytes": trainer.ps.counter.snapshot(), "top_ops": dict(ops.ops.most_common(12))}


def start_world(world_size: int) -> None:
    """Rank 0 of a world of `world_size`: the fake process group above 1 rank."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    if world_size > 1 and not dist.is_initialized():
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


@contextlib.contextmanager
def one_cpu_gemm_per_product():
    """The CPU GEMM as one call per product, as on a GPU: on the CPU `fp8.gemm` otherwise runs a
    large product in blocks of rows and columns, to bound its FP32 operand copies."""
    from fp8 import gemm

    original = gemm.CPU_GEMM_BLOCK_NUMEL
    gemm.CPU_GEMM_BLOCK_NUMEL = 1 << 62
    try:
        yield
    finally:
        gemm.CPU_GEMM_BLOCK_NUMEL = original


@contextlib.contextmanager
def fused_attention_on_meta():
    """On the meta device `scaled_dot_product_attention` falls back to its unfused reference
    (matmuls, masks, softmax); a GPU runs the flash kernel. Causal attention without a mask or
    dropout goes to the flash operator here too (its meta kernel and its backward), as on CUDA."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if query.is_meta and attn_mask is None and dropout_p == 0.0 and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def meta_as_a_gpu():
    """Meta tensors take the code paths of an H100's: FP8 GEMMs through `torch._scaled_mm` (its
    meta kernel) where sm90 has one, and FP8AdamW's multi-tensor step."""
    from fp8 import gemm, optim_foreach

    info, types = gemm.device_info, optim_foreach.FOREACH_DEVICE_TYPES

    def device_info(device: torch.device):
        if torch.device(device).type != "meta":
            return info(device)
        return dataclasses.replace(info(torch.device("cpu")), type="cuda", capability=(9, 0), cuda_version=(12, 9))

    gemm.device_info, optim_foreach.FOREACH_DEVICE_TYPES = device_info, tuple(types) + ("meta",)
    try:
        yield
    finally:
        gemm.device_info, optim_foreach.FOREACH_DEVICE_TYPES = info, types


def audit_level(level: str, flags: list[str], world_size: int, device: str = "cpu", fused_casts: bool = False) -> dict:
    from megatron.core.tokenizers.tokenizer import build_tokenizer
    from megatron.training.config import parse_config
    from megatron.training.gpt_providers import gpt_task
    from megatron.training.training import Trainer, setup_parallel

    start_world(world_size)
    config, ps = setup_parallel(parse_config(flags + ["--fp8-level", level]))
    if device == "meta":  # tensors with shapes and no data: any model size in no memory
        ps = dataclasses.replace(ps, device=torch.device("meta"))
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
    values = OpCounter()  # on the meta device: stand-ins for what the host reads outside the count
    with cuda_optimizer_defaults(), values, values.host_copies():
        trainer = Trainer(config, ps, gpt_task(config, ps, vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod))
    try:
        compiled = fused_kernels() if fused_casts else contextlib.nullcontext()
        with one_cpu_gemm_per_product(), fused_attention_on_meta(), meta_as_a_gpu(), compiled:
            with values, values.host_copies():
                trainer.train_step()  # warm-up: compilation and first allocations
            counts = audit_step(trainer)
    finally:
        trainer.close()
    return dict(counts, layout=ps.describe(), num_microbatches=trainer.num_microbatches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt-tiny.yaml"))
    parser.add_argument("--levels", default="none,O2,O3", help="comma-separated --fp8-level values")
    parser.add_argument("--world-size", type=int, default=1, help="ranks of the (fake) world; this process is rank 0")
    parser.add_argument("--device", default="cpu", choices=("cpu", "meta"),
                        help="meta: tensors without data, so that any model size runs (host reads see 1 / 0)")
    parser.add_argument("--data-args", default=None,
                        help="the --data-path / --tokenizer-* flags as one string (default: the built-in corpus)")
    parser.add_argument("--fused-casts", action="store_true",
                        help="FP8 casts compiled (--fp8-fused-casts on), each counted as the kernels Inductor makes of it")
    parser.add_argument("--json", default=str(RESULTS / "launch_audit-cpu.json"))
    parser.add_argument("flags", nargs="*", help="more pretrain_gpt.py flags, after --")
    args = parser.parse_args(argv)
    data = args.data_args.split() if args.data_args else builtin_corpus_args()
    # The chunk a CUDA run takes (unless given): the audit counts what a GPU would launch.
    chunk = [] if "--fp8-chunk-mb" in args.flags else ["--fp8-chunk-mb", str(CUDA_CHUNK_MB)]
    base = ["--config", args.config, "--device", "cpu", "--train-iters", "100", "--lr-warmup-iters", "1", "--eval-iters", "0",
            "--log-interval", "1000", "--num-workers", "0", "--fp8-fused-casts", "on" if args.fused_casts else "off",
            *chunk, *data, *args.flags]
    rows = {}
    for level in args.levels.split(","):
        rows[level] = audit_level(level, base, args.world_size, args.device, args.fused_casts)
    print(format_table(rows))
    save_results(args.json, run_meta("launch_audit.py", argv, world_size=args.world_size, device=args.device,
                                      fused_casts=args.fused_casts, flags=base), levels=rows)
    return 0


def format_table(rows: dict) -> str:
    """A line per level; launches and collectives also as a multiple of `none`'s when it ran."""
    none = rows.get("none")
    lines = [f"{'level':6} {'launches':>9} {'x none':>7} {'syncs':>6} {'host reads':>10} {'host data':>9} "
             f"{'collectives':>11} {'x none':>7} {'bytes':>12}"]
    for level, row in rows.items():
        ratio = f"{row['launches'] / none['launches']:.2f}" if none else "-"
        coll = f"{row['collectives'] / max(none['collectives'], 1):.2f}" if none else "-"
        lines.append(f"{level:6} {row['launches']:>9,} {ratio:>7} {row['host_syncs']:>6} {row['host_reads']:>10} "
                     f"{row['scalar_to_device']:>9} {row['collectives']:>11} {coll:>7} {row['collective_bytes']:>12,}")
    return "\n".join(lines)


def builtin_corpus_args() -> list[str]:
    import subprocess
    out = subprocess.run([sys.executable, "tools/builtin_corpus.py", "--print-args", "--quiet"], cwd=REPO,
                         check=True, capture_output=True, text=True)
    return out.stdout.split()


if __name__ == "__main__":
    sys.exit(main())
