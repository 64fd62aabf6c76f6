"""What every benchmark script shares: where results go and what each JSON records about the run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_meta(script: str, argv: list[str] | None, **extra) -> dict:
    """Date, machine and the command line, so a figure can be quoted with all three."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "host": platform.node(),
            "command": " ".join(["python", f"bench/{script}"] + (argv if argv is not None else sys.argv[1:])),
            **extra}


def requested_device(name: str):
    """The torch device a bench was asked for, or None after one error line when it is a GPU
    that is not there (the caller then exits 2)."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible; use --device cpu", file=sys.stderr)
        return None
    return device


def save_results(out: str | Path, meta: dict, **payload) -> Path:
    """Write {"meta": ..., **payload} as JSON, atomically; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, **payload}, indent=1))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return out


def build_gpt_training(model: dict, ps, device, fp8_config, *, lr: float, use_distributed_optimizer: bool = False,
                       once_per_step: bool = False):
    """A single-device-layout GPT of `model` (num_layers, hidden_size, num_attention_heads,
    vocab_size, seq_length, ffn_hidden_size) in BF16, initialised, given `fp8_config`'s precision,
    wrapped for data parallelism, with its optimizer (weight decay 0.1, clip 1.0):
    (model, ddp, optimizer, precision). With `once_per_step` (as the trainer) the caller calls
    ``precision.end_step()`` after each optimizer step."""
    import torch

    from megatron.core.distributed.data_parallel import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.factory import build_optimizer
    from megatron.core.parallelize import initialize_parameters, parallelize_gpt
    from megatron.core.precision import apply_precision
    from megatron.core.transformer.config import TransformerConfig

    config = TransformerConfig(num_layers=model["num_layers"], hidden_size=model["hidden_size"],
                               num_attention_heads=model["num_attention_heads"], vocab_size=model["vocab_size"],
                               max_position_embeddings=model["seq_length"], ffn_hidden_size=model["ffn_hidden_size"],
                               hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.bfloat16)
    gpt = GPTModel(config, device="meta")
    parallelize_gpt(gpt, ps)
    initialize_parameters(gpt, ps, seed=1234, device=device)
    precision = apply_precision(gpt, fp8_config, ps, once_per_step=once_per_step)
    ddp = DistributedDataParallel(gpt, ps, use_distributed_optimizer=use_distributed_optimizer, precision=precision,
                                  shard_dense_grads=precision.zero is not None)  # as the trainer: ZeRO-2 at O3
    named = [(n, p) for n, p in gpt.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, OptimizerConfig(lr=lr, weight_decay=0.1, clip_grad=1.0), ps, ddp, precision,
                                use_distributed_optimizer=use_distributed_optimizer)
    return gpt, ddp, optimizer, precision
