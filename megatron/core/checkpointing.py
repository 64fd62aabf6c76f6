"""Checkpoints that survive crashes and load into another parallel layout.

Layout of `--save DIR`:

    DIR/latest_checkpointed_iteration.txt   written last, by rename: the checkpoint to resume from
    DIR/iter_0000100/metadata.json          model shape, parallel layout, iteration
    DIR/iter_0000100/common.pt              iteration, consumed samples, LR schedule, run flags
    DIR/iter_0000100/rank_00003.pt          what global rank 3 holds (see `rank_payload`)

A save writes into `iter_0000100.tmp/` and renames it into place once every rank has written,
then moves the marker; a crash at any point leaves the previous checkpoint and marker intact.
Tensors are stored per parameter under its *global* name with how it was sharded (tensor-parallel
dimension, rank, size; the range of the flattened shard an optimizer rank owns), so a loader
with another TP / PP / DP layout reassembles each full tensor and takes its own shard. Loading
uses ``torch.load(weights_only=True)``: a file that needs code execution is refused, not run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from fp8.params import param_value, set_param_value
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.layout import ParamLayout, layouts_of

FORMAT_VERSION = 1
MARKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_KEYS = ("master", "exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _barrier(ps: ParallelState) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----- what a rank saves -------------------------------------------------------------------------
def _shard_info(layout: ParamLayout, ps: ParallelState) -> dict:
    return {**layout.describe(), "tp_rank": ps.tp_rank, "tp_size": ps.tp_size}


def named_global_params(model: nn.Module, global_name) -> dict[str, nn.Parameter]:
    """Parameters by global name (tied duplicates appear once); `model` may be a ModuleList of
    virtual pipeline chunks, each named on its own."""
    chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
    out, seen = {}, set()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                out[global_name(chunk, name)] = param
    return out


def rng_state(tracker=None) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict, tracker=None) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and "tracker" in state:
        tracker.set_states(state["tracker"])


def rank_payload(model: nn.Module, optimizer, ps: ParallelState, global_name, tracker=None) -> dict:
    params = named_global_params(model, global_name)
    layouts = layouts_of(model)
    opt_state = optimizer.local_state() if optimizer is not None else {}
    model_part, optim_part = {}, {}
    for name, param in params.items():
        model_part[name] = {"tensor": param_value(param).cpu(), "shard": _shard_info(layouts[param], ps)}
        if param in opt_state:
            entry = opt_state[param]
            optim_part[name] = {"range": list(entry["range"]),
                                **{k: entry[k].detach().cpu() for k in OPTIMIZER_KEYS if k in entry}}
    extra = {name: module.get_extra_state() for name, module in model.named_modules()
             if type(module).get_extra_state is not nn.Module.get_extra_state}
    return {"format": FORMAT_VERSION, "model": model_part, "optimizer": optim_part,
            "optimizer_step": optimizer.step_count() if optimizer is not None else 0,
            "extra_state": extra, "rng": rng_state(tracker)}


# ----- saving -----------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    iteration: int
    consumed_samples: int
    metadata: dict


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, iteration: int, *, ps: ParallelState, payload: dict, common: dict,
                    metadata: dict) -> Path:
    """Every rank calls this with its own `payload`; rank 0 also writes `common` and `metadata`."""
    root_path = Path(root)
    final, staging = iteration_dir(root_path, iteration), Path(str(iteration_dir(root_path, iteration)) + ".tmp")
    if ps.rank == 0:
        root_path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
        staging.mkdir()
    _barrier(ps)
    _torch_save_atomic(payload, staging / f"rank_{ps.rank:05d}.pt")
    _barrier(ps)
    if ps.rank == 0:
        _torch_save_atomic(common, staging / "common.pt")
        _atomic_write_bytes(staging / "metadata.json", json.dumps(metadata, indent=1, sort_keys=True).encode())
        if final.exists():  # saving the same iteration again: replace it whole
            old = Path(str(final) + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        _atomic_write_bytes(root_path / MARKER, f"{iteration}\n".encode())
    _barrier(ps)
    return final


# ----- loading ----------------------------------------------------------------------------------
def latest_iteration(root: str) -> int | None:
    """The iteration the marker names, None when there is no checkpoint at all."""
    marker = Path(root) / MARKER
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker} does not hold an iteration number ({text[:40]!r}); "
                              f"fix or delete it, or point --load at another folder")
    iteration = int(text)
    if not iteration_dir(root, iteration).is_dir():
        raise CheckpointError(f"{marker} names iteration {iteration}, but {iteration_dir(root, iteration)} is "
                              f"missing; restore it or point --load at another folder")
    return iteration


def safe_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, load another one") from None
    except Exception as exc:  # pickle refusing a global, a truncated zip, ...
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded safely ({reason}); it is not a checkpoint this "
                              f"framework wrote, or it is damaged") from None


def read_metadata(root: str, iteration: int) -> dict:
    path = iteration_dir(root, iteration) / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); the checkpoint is damaged") from None


def check_model_matches(saved: dict, current: dict) -> None:
    for key, value in current.items():
        if key in saved and saved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"the checkpoint is of another model: it has {flag} {saved[key]}, this run "
                                  f"{value}; use the same model settings or another --load folder")


def _assemble_tp(pieces_by_tp_rank: dict[int, torch.Tensor], shard: dict) -> torch.Tensor:
    """Full tensor from its tensor-parallel shards (inverse of `shard_of`)."""
    dim, parts, size = shard["dim"], shard["parts"], shard["tp_size"]
    if dim is None or size == 1:
        return pieces_by_tp_rank[0]
    ordered = [pieces_by_tp_rank[r].chunk(parts, dim=dim) for r in range(size)]
    return torch.cat([torch.cat([o[p] for o in ordered], dim=dim) for p in range(parts)], dim=dim)


class ShardedCheckpoint:
    """The rank files of one checkpoint, reassembled per global name on demand. With `ranks`
    only those files are read (the same-layout fast path reads just its own)."""

    def __init__(self, folder: Path, ranks: list[int]):
        self.payloads = [safe_load(folder / f"rank_{r:05d}.pt") for r in ranks]
        for payload in self.payloads:
            if payload.get("format") != FORMAT_VERSION:
                raise CheckpointError(f"{folder} has checkpoint format {payload.get('format')}, this version "
                                      f"reads {FORMAT_VERSION}; convert it with tools/checkpoint_convert.py")

    def names(self) -> set[str]:
        return {name for payload in self.payloads for name in payload["model"]}

    def full_tensor(self, name: str) -> torch.Tensor:
        pieces, shard = {}, None
        for payload in self.payloads:
            entry = payload["model"].get(name)
            if entry is not None:
                shard = entry["shard"]
                pieces.setdefault(shard["tp_rank"], entry["tensor"])
        if shard is None:
            raise KeyError(name)
        return _assemble_tp(pieces, shard)

    def full_optimizer_state(self, name: str) -> dict[str, torch.Tensor]:
        """Each optimizer state of `name` as a full tensor, from the ranges every rank owned."""
        shard = next(p["model"][name]["shard"] for p in self.payloads if name in p["model"])
        flat: dict[str, dict[int, torch.Tensor]] = {}
        shapes = {}
        for payload in self.payloads:
            entry, model_entry = payload["optimizer"].get(name), payload["model"].get(name)
            if entry is None:
                continue
            tp_rank = model_entry["shard"]["tp_rank"]
            shapes[tp_rank] = model_entry["tensor"].shape
            for key in OPTIMIZER_KEYS:
                if key in entry:
                    target = flat.setdefault(key, {}).setdefault(
                        tp_rank, torch.zeros(model_entry["tensor"].numel(), dtype=torch.float32))
                    start, end = entry["range"]
                    target[start:end] = entry[key].float()
        return {key: _assemble_tp({r: t.view(shapes[r]) for r, t in by_rank.items()}, shard)
                for key, by_rank in flat.items()}


def _local_states(ckpt: ShardedCheckpoint, name: str, layout: ParamLayout, ps: ParallelState,
                  same_layout: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's shard of a parameter and of its optimizer states."""
    if same_layout:  # only our own file was read; its pieces are already ours
        own = ckpt.payloads[0]
        tensor = own["model"][name]["tensor"]
        states = {}
        entry = own["optimizer"].get(name)
        for key in OPTIMIZER_KEYS if entry else ():
            if key in entry:
                # Outside the owned range: the parameter's value for the master (the optimizer
                # sets the parameter from it), zeros for the moments (another rank's business).
                base = tensor.float().reshape(-1).clone() if key == "master" else torch.zeros(tensor.numel())
                base[entry["range"][0]:entry["range"][1]] = entry[key].float()
                states[key] = base.view(tensor.shape)
        return tensor, states
    full_states = ckpt.full_optimizer_state(name)
    return (layout.shard(ckpt.full_tensor(name), ps.tp_rank, ps.tp_size),
            {k: layout.shard(v, ps.tp_rank, ps.tp_size) for k, v in full_states.items()})


def load_checkpoint(root: str, *, ps: ParallelState, model: nn.Module, optimizer, global_name,
                    model_config: dict, layout: dict, load_optim: bool = True, load_rng: bool = True,
                    tracker=None) -> tuple[CheckpointInfo, dict] | None:
    """Load the checkpoint the marker in `root` names into `model` (and `optimizer`), resharding
    when `layout` differs from the saved one. Returns None when `root` holds no checkpoint."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    folder = iteration_dir(root, iteration)
    metadata = read_metadata(root, iteration)
    check_model_matches(metadata.get("model", {}), model_config)
    same_layout = metadata.get("layout") == layout
    ranks = [ps.rank] if same_layout else list(range(metadata["layout"]["world_size"]))
    ckpt = ShardedCheckpoint(folder, ranks)
    params = named_global_params(model, global_name)
    available = ckpt.names() if not same_layout else set(ckpt.payloads[0]["model"])
    missing = sorted(set(params) - available)
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} parameters of this model (first: {missing[0]}); "
                              f"it is of another model - use the same model settings or another --load folder")
    full_states = {}
    layouts = layouts_of(model)
    with torch.no_grad():
        for name, param in params.items():
            tensor, states = _local_states(ckpt, name, layouts[param], ps, same_layout)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{name} has shape {tuple(tensor.shape)} in the checkpoint, {tuple(param.shape)} "
                                      f"here; the checkpoint is of another model")
            set_param_value(param, tensor)
            if states:
                full_states[param] = states
    own = ckpt.payloads[0]
    if load_optim and optimizer is not None:
        optimizer.load_local_state(full_states, own.get("optimizer_step", 0))
    elif optimizer is not None:
        # Fresh moments, but masters must follow the loaded weights (a separate master - FP32 for
        # a BF16 model, FP16 on an O3 owner - would otherwise pull them back to their start).
        optimizer.load_local_state({param: {"master": full_states.get(param, {}).get("master", param_value(param))}
                                    for param in params.values()}, 0)
    if same_layout:
        modules = dict(model.named_modules())
        for name, state in own.get("extra_state", {}).items():
            if name in modules:
                modules[name].set_extra_state(state)
        if load_rng:
            set_rng_state(own["rng"], tracker)
    common = safe_load(folder / "common.pt")
    return CheckpointInfo(iteration, int(common.get("consumed_samples", 0)), metadata), common
