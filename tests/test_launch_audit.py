"""bench/launch_audit.py: its counts of one training step agree with independent counts of the
same step (every dispatched operation, the model's GEMMs, the bytes the trainer's own counters
charge), and its command line writes the JSON and table it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from bench import launch_audit

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64",
         "--max-position-embeddings", "64"]


class AllOps(TorchDispatchMode):
    """The plainest count: every operation that reaches the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def test_counts_agree_with_an_independent_count_of_the_same_step(builtin_corpus_small, monkeypatch):
    """One process, level none: every operation the audit sees is one the plain counter sees, each
    is put in one class, and the GEMMs are the model's: forward, input gradient and weight gradient
    of 4 linears per layer plus the output layer, per micro-batch."""
    from megatron.core.tokenizers.tokenizer import build_tokenizer
    from megatron.training.config import parse_config
    from megatron.training.gpt_providers import gpt_task
    from megatron.training.training import Trainer, setup_parallel

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    flags = ["--config", str(REPO / "configs" / "gpt-tiny.yaml"), "--device", "cpu", "--train-iters", "10",
             "--lr-warmup-iters", "1", "--eval-iters", "0", "--num-workers", "0", "--fp8-level", "none",
             *SMALL, *builtin_corpus_small.training_args()]
    config, ps = setup_parallel(parse_config(flags))
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
    with launch_audit.cuda_optimizer_defaults():
        trainer = Trainer(config, ps, gpt_task(config, ps, vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod))
    try:
        trainer.train_step()
        launch_audit.read_step_batches(trainer)
        with AllOps() as plain:
            counts = launch_audit.count_step(trainer)
    finally:
        trainer.close()
    assert counts["dispatched"] == sum(plain.ops.values())
    classes = ("launches", "host_syncs", "host_reads", "scalar_to_device")
    views = sum(n for func, n in plain.ops.items() if launch_audit.op_kind(func) == "none")
    assert sum(counts[c] for c in classes) + views == counts["dispatched"]
    layers, micro = config.model.num_layers, trainer.num_microbatches
    assert micro == 2 and counts["gemms"] == 3 * (4 * layers + 1) * micro
    assert counts["collectives"] == 0 and not counts["skipped"]
    # The trainer reads the loss and the gradient norm: a handful of syncs, not one per tensor.
    assert 1 <= counts["host_syncs"] <= 4
    # AdamW's step counts, on the host in a CUDA run: read once or twice per parameter (torch's choice).
    assert counts["host_reads"] in {k * sum(1 for _ in trainer.model.parameters()) for k in (1, 2)}


def test_the_command_line_at_data_parallel_2(builtin_corpus_small, tmp_path):
    """Two ranks of the fake process group, none and O3: every collective of `none` is an
    all-reduce over 2 ranks, whose ring cost is the tensor's size, so the bytes handed to
    torch.distributed equal the trainer's own count; O3 reduces FP8 gradients to their owners
    (all-to-all) and gathers the updated FP8 weights."""
    out = tmp_path / "audit.json"
    data = " ".join(builtin_corpus_small.training_args())
    done = subprocess.run([sys.executable, "bench/launch_audit.py", "--levels", "none,O3", "--world-size", "2",
                           "--data-args", data, "--json", str(out), "--", *SMALL],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["levels"]
    none, o3 = rows["none"], rows["O3"]
    assert set(none["collectives_by_name"]) == {"all_reduce"}
    assert none["collective_bytes"] == sum(none["comm_ring_bytes"].values()) > 0
    assert {"all_to_all_single", "all_gather"} <= set(o3["collectives_by_name"])
    assert o3["launches"] > none["launches"] > 0 and not o3["skipped"]
    table = done.stdout.splitlines()
    assert any(line.startswith("none ") and " 1.00 " in line for line in table)
    assert any(line.startswith("O3 ") for line in table)


def test_the_meta_device_counts_what_the_cpu_counts(builtin_corpus_small, monkeypatch):
    """`--device meta` (how the paper's sizes are audited): the same step on tensors without data
    dispatches what the CPU step does, apart from copying the micro-batches to the device (a real
    copy on a GPU, none on the CPU), the attention kernel's name, and the gradient clipping, which
    the stand-in norm (1.0) does not trigger; syncs, collectives and bytes are the same. At O3 the
    reduction's statistics come to the host with the loss, in one read (`.tolist()` counts as a
    sync): as many syncs as `none`, the loss's and the gradient norm's."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)  # what start_world sets, undone after the test
    flags = ["--config", str(REPO / "configs" / "gpt-tiny.yaml"), "--device", "cpu", "--train-iters", "10",
             "--lr-warmup-iters", "1", "--eval-iters", "0", "--num-workers", "0", "--fp8-fused-casts", "off",
             *SMALL, *builtin_corpus_small.training_args()]
    launch_audit.start_world(2)
    try:
        rows = {(level, device): launch_audit.audit_level(level, flags, 2, device)
                for level in ("none", "O3") for device in ("cpu", "meta")}
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()
    for level in ("none", "O3"):
        cpu, meta = rows[level, "cpu"], rows[level, "meta"]
        batch_copies = 4 * cpu["num_microbatches"]  # tokens, labels, loss mask, positions: to the device
        for key in ("host_syncs", "scalar_to_device", "collectives", "collective_bytes", "gemms"):
            assert cpu[key] == meta[key], (level, key, cpu[key], meta[key])
        assert abs(meta["launches"] - cpu["launches"] - batch_copies) <= 2, (level, cpu["launches"], meta["launches"])
    assert rows["none", "cpu"]["host_syncs"] == 2
    assert rows["O3", "cpu"]["host_syncs"] == 2


@pytest.mark.slow
def test_fused_casts_count_the_kernels_inductor_writes(monkeypatch):
    """Under `fused_kernels` a compiled cast is counted as the kernels Inductor generated for it
    (read from the generated code), which equals Inductor's own count of the kernels it wrote
    (`generated_kernel_count`, a fresh compilation); the cast's own operations are not counted,
    and its bytes are the eager cast's."""
    import torch
    import torch._inductor.metrics as inductor_metrics

    from fp8 import fused
    from fp8.tensor import quantize

    monkeypatch.setattr(fused, "_state", {"mode": "on"})
    x = torch.randn(64, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(3.0)
    torch._dynamo.reset()
    before = inductor_metrics.generated_kernel_count
    torch.compile(fused.scaled_cast, dynamic=True, fullgraph=True)(x * 2, scale, "tensor", 448.0,
                                                                   torch.float8_e4m3fn, False)
    written = inductor_metrics.generated_kernel_count - before
    assert written >= 1
    with launch_audit.fused_kernels():
        counter = launch_audit.OpCounter()
        with counter:
            fused_cast = quantize(x, "e4m3", scale=scale)
    assert counter.kinds["launch"] == counter.ops["compiled.scaled_cast"] == written
    monkeypatch.setattr(fused, "_state", {"mode": "off"})
    eager = quantize(x, "e4m3", scale=scale)
    assert torch.equal(fused_cast.data.view(torch.uint8), eager.data.view(torch.uint8))
