"""Checkpoints that survive crashes and load into another parallel layout.

Layout of `--save DIR`:

    DIR/latest_checkpointed_iteration.txt   written last, by rename: the checkpoint to resume from
    DIR/iter_0000100/metadata.json          model shape, parallel layout, iteration
    DIR/iter_0000100/common.pt              iteration, consumed samples, LR schedule, run flags
    DIR/iter_0000100/rank_00003.pt          what global rank 3 holds (see `rank_payload`)
    DIR/iter_0000100/manifest.json          every other file's size and sha256

A save writes into `iter_0000100.tmp/` and renames it into place once every rank has written,
then moves the marker; a crash at any point leaves the previous checkpoint and marker intact.

Loading checks what it reads before using it: the marker, the metadata's keys and types, every
file's size against the manifest (always: a stat), the sha256 of each file a rank reads (alongside
its `torch.load`; `verify_checksums=False` skips it, see `checkpoint_integrity` for the costs), the
rank files' structure, and that every loaded value is finite (a run that diverged before its save
is not resumed). A checkpoint written before manifests existed loads without the size and
checksum checks. Each problem is a `CheckpointError` of one line naming the file and the fix.

Tensors are stored per parameter under its *global* name with how it was sharded (tensor-parallel
dimension, rank, size; the range of the flattened shard an optimizer rank owns), so a loader
with another TP / PP / DP layout reassembles each full tensor and takes its own shard. Loading
uses ``torch.load(weights_only=True)``: a file that needs code execution is refused, not run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from fp8.params import param_value, set_param_value
from megatron.core.checkpoint_integrity import (  # noqa: F401 - CheckpointError, MANIFEST: public here
    MANIFEST, BackgroundHash, CheckpointError, all_finite, check_file_sizes, checksum_mismatch, file_record,
    first_line, is_int, metadata_problem, payload_problem, read_manifest, write_manifest,
)
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.layout import ParamLayout, layouts_of

FORMAT_VERSION = 1
MARKER = "latest_checkpointed_iteration.txt"
OPTIMIZER_KEYS = ("master", "exp_avg", "exp_avg_sq")
_ITERATION_DIR = re.compile(r"iter_(\d{7,})")


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def saved_iterations(root: str | os.PathLike) -> list[int]:
    """The iterations of the checkpoint folders in `root` (not the `.tmp` of an unfinished save), sorted."""
    folder = Path(root)
    if not folder.is_dir():
        return []
    found = (_ITERATION_DIR.fullmatch(entry.name) for entry in folder.iterdir() if entry.is_dir())
    return sorted(int(match.group(1)) for match in found if match)


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


def _record_path(rank_file: Path) -> Path:
    """Where a rank leaves its file's manifest record for rank 0."""
    return rank_file.with_name(f".{rank_file.name}.record.json")


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
    rank_file = staging / f"rank_{ps.rank:05d}.pt"
    _torch_save_atomic(payload, rank_file)
    # Each rank hashes its own file (read back from the page cache) for the manifest.
    _atomic_write_bytes(_record_path(rank_file), json.dumps(file_record(rank_file)).encode())
    _barrier(ps)
    if ps.rank == 0:
        _torch_save_atomic(common, staging / "common.pt")
        _atomic_write_bytes(staging / "metadata.json", json.dumps(metadata, indent=1, sort_keys=True).encode())
        records = {}
        for rank in range(ps.world_size):
            record_path = _record_path(staging / f"rank_{rank:05d}.pt")
            records[f"rank_{rank:05d}.pt"] = json.loads(record_path.read_text())
            record_path.unlink()
        write_manifest(staging, records)
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
    """The iteration the marker names, None when there is no checkpoint at all. Checkpoint
    folders without a marker are an error: resuming must not silently start over on top of them."""
    marker = Path(root) / MARKER
    if not marker.exists():
        found = saved_iterations(root)
        if found:
            raise CheckpointError(
                f"{root} holds checkpoint folders ({iteration_dir(root, found[-1]).name} the latest) but no {MARKER}; "
                f"restore it (e.g. write {found[-1]} into {marker} to resume from iteration {found[-1]}) or pass "
                f"another --load")
        return None
    try:
        raw = marker.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{marker} cannot be read ({exc.strerror}); fix it (it holds the iteration to resume "
                              f"from) or point --load at another folder") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not text.isdigit():
        shown = raw[:40].decode("ascii", errors="replace").strip() if text is None else text[:40]
        kind = "is not text" if text is None else "does not hold an iteration number"
        raise CheckpointError(f"{marker} {kind} ({shown!r}); write the iteration to resume from into it (one number, "
                              f"e.g. {_example_iteration(root)}), or point --load at another folder")
    iteration = int(text)
    if not iteration_dir(root, iteration).is_dir():
        raise CheckpointError(f"{marker} names iteration {iteration}, but {iteration_dir(root, iteration)} is "
                              f"missing; restore it or point --load at another folder")
    return iteration


def _example_iteration(root) -> str:
    found = saved_iterations(root)
    return str(found[-1]) if found else "100"


def safe_load(path: Path, manifest: dict | None = None, *, verify_checksums: bool = True):
    """`torch.load(weights_only=True)` of a checkpoint file, checked against its manifest record
    when there is one (the sha256 computed while the file loads)."""
    record = (manifest or {}).get(path.name)
    hashing = BackgroundHash(path) if record is not None and verify_checksums and path.is_file() else None
    error = loaded = None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, load another one") from None
    except Exception as exc:  # pickle refusing a global, a truncated zip, ...
        error = exc
    if hashing is not None and not hashing.matches(record["sha256"]):
        raise checksum_mismatch(path)
    if error is not None:
        raise CheckpointError(f"{path} cannot be loaded safely ({first_line(error)[:200]}); it is not a checkpoint "
                              f"this framework wrote, or it is damaged") from None
    return loaded


def read_metadata(root: str, iteration: int, manifest: dict | None = None) -> dict:
    """The metadata of a checkpoint, its keys and types checked (and its checksum, with `manifest`)."""
    path = iteration_dir(root, iteration) / "metadata.json"
    try:
        raw = path.read_bytes()
        metadata = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSON and UTF-8 decoding
        raise CheckpointError(f"{path} is unreadable ({first_line(exc)}); the checkpoint is damaged - "
                              f"load another one") from None
    record = (manifest or {}).get(path.name)
    if record is not None and hashlib.sha256(raw).hexdigest() != record["sha256"]:
        raise checksum_mismatch(path)
    problem = metadata_problem(metadata)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem}); restore it or load another checkpoint")
    return metadata


def _refuse_non_finite(root: str, iteration: int, what: str) -> None:
    earlier = [i for i in saved_iterations(root) if i < iteration]
    fix = (f"resume from an earlier checkpoint (write {earlier[-1]} into {Path(root) / MARKER}) or pass another --load"
           if earlier else "pass another --load, or start over without it")
    raise CheckpointError(f"{iteration_dir(root, iteration)}: {what} holds NaN or infinite values (the run had "
                          f"diverged when it was saved); {fix}")


def check_model_matches(saved: dict, current: dict) -> None:
    for key, value in current.items():
        if key not in saved or saved[key] == value:
            continue
        if key == "vocab_size":  # the embedding's rows: the vocabulary padded for this layout
            raise CheckpointError(f"the checkpoint's vocabulary is padded to {saved[key]} rows, this run's to {value} "
                                  f"(a multiple of --make-vocab-size-divisible-by x --tensor-model-parallel-size); pass "
                                  f"the --make-vocab-size-divisible-by that pads to {saved[key]} at this "
                                  f"tensor-parallel size, or convert the checkpoint (tools/checkpoint/convert.py)")
        if key == "unpadded_vocab_size":
            raise CheckpointError(f"the checkpoint's model has a vocabulary of {saved[key]} ids, this run's "
                                  f"{value}; pass the tokenizer of the run that saved it, or another --load folder")
        flag = "--" + key.replace("_", "-")
        raise CheckpointError(f"the checkpoint is of another model: it has {flag} {saved[key]}, this run "
                              f"{value}; use the same model settings or another --load folder")


def recorded_vocab_size(metadata: dict, common: dict) -> int | None:
    """The model's vocabulary (ids; the embedding's rows may pad it) as a checkpoint records it.
    Checkpoints written before it was recorded: the imported model's rows (tools/checkpoint/convert.py
    notes them), else the size of the tokenizer its run recorded, else every row."""
    signature = metadata.get("model") or {}
    if isinstance(signature.get("actor"), dict):  # an actor-critic checkpoint: its actor's
        signature = signature["actor"]
    rows = signature.get("vocab_size")
    if signature.get("unpadded_vocab_size"):
        return int(signature["unpadded_vocab_size"])
    imported = ((common or {}).get("hf_import") or {}).get("vocab_size")
    if imported:
        return int(imported)
    tokenizer = (metadata.get("tokenizer") or {}).get("vocab_size")
    if tokenizer and rows and tokenizer <= rows:
        return int(tokenizer)
    return None if rows is None else int(rows)


def saved_vocab_size(root: str) -> int | None:
    """`recorded_vocab_size` of the latest checkpoint in `root`; None when it holds none."""
    iteration = latest_iteration(root) if Path(root).is_dir() else None
    if iteration is None:
        return None
    folder = iteration_dir(root, iteration)
    manifest = read_manifest(folder)
    metadata = read_metadata(root, iteration, manifest)
    common = safe_load(folder / "common.pt", manifest)
    return recorded_vocab_size(metadata, common if isinstance(common, dict) else {})


def _assemble_tp(pieces_by_tp_rank: dict[int, torch.Tensor], shard: dict) -> torch.Tensor:
    """Full tensor from its tensor-parallel shards (inverse of `shard_of`)."""
    dim, parts, size = shard["dim"], shard["parts"], shard["tp_size"]
    if dim is None or size == 1:
        return pieces_by_tp_rank[0]
    ordered = [pieces_by_tp_rank[r].chunk(parts, dim=dim) for r in range(size)]
    return torch.cat([torch.cat([o[p] for o in ordered], dim=dim) for p in range(parts)], dim=dim)


def check_rank_payload(path: Path, payload) -> None:
    """The structure `rank_payload` writes, so that a damaged file is one clear error here and not
    a KeyError deep in resharding."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a rank file of this framework; the "
                              f"checkpoint is damaged - load another one")
    if payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload.get('format')!r}, this version reads "
                              f"{FORMAT_VERSION}; load it with the version of this framework that wrote it")
    problem = payload_problem(payload, OPTIMIZER_KEYS)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem}); load another checkpoint")


class ShardedCheckpoint:
    """The rank files of one checkpoint, reassembled per global name on demand. With `ranks`
    only those files are read (the same-layout fast path reads just its own)."""

    def __init__(self, folder: Path, ranks: list[int], manifest: dict | None = None, *, verify_checksums: bool = True):
        self.payloads = []
        for rank in ranks:
            path = folder / f"rank_{rank:05d}.pt"
            payload = safe_load(path, manifest, verify_checksums=verify_checksums)
            check_rank_payload(path, payload)
            self.payloads.append(payload)

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
                    tracker=None, verify_checksums: bool = True) -> tuple[CheckpointInfo, dict] | None:
    """Load the checkpoint the marker in `root` names into `model` (and `optimizer`), resharding
    when `layout` differs from the saved one. Returns None when `root` holds no checkpoint.
    The files and values are checked before any parameter changes (see the module's docstring)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    folder = iteration_dir(root, iteration)
    manifest = read_manifest(folder)
    check_file_sizes(folder, manifest)
    metadata = read_metadata(root, iteration, manifest)
    if metadata["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{folder} has checkpoint format {metadata['format']}, this version reads "
                              f"{FORMAT_VERSION}; load it with the version of this framework that wrote it")
    check_model_matches(metadata.get("model") or {}, model_config)
    same_layout = metadata["layout"] == layout
    ranks = [ps.rank] if same_layout else list(range(metadata["layout"]["world_size"]))
    common = safe_load(folder / "common.pt", manifest, verify_checksums=verify_checksums)
    _check_common(folder / "common.pt", common)
    ckpt = ShardedCheckpoint(folder, ranks, manifest, verify_checksums=verify_checksums)
    params = named_global_params(model, global_name)
    available = ckpt.names() if not same_layout else set(ckpt.payloads[0]["model"])
    missing = sorted(set(params) - available)
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} parameters of this model (first: {missing[0]}); "
                              f"it is of another model - use the same model settings or another --load folder")
    _check_finite(ckpt, params, root, iteration, load_optim)
    if load_rng and same_layout and not isinstance(ckpt.payloads[0].get("rng"), dict):
        raise CheckpointError(f"{folder / f'rank_{ps.rank:05d}.pt'} has no random-number state; pass --no-load-rng or "
                              f"load another checkpoint")
    full_states = {}
    layouts = layouts_of(model)
    with torch.no_grad():
        for name, param in params.items():
            tensor, states = _checked_local_states(ckpt, name, layouts[param], ps, same_layout, folder)
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
            try:
                set_rng_state(own["rng"], tracker)
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
                raise CheckpointError(f"{folder / f'rank_{ps.rank:05d}.pt'}: its random-number state is damaged "
                                      f"({first_line(exc)}); pass --no-load-rng or load another checkpoint") from None
    return CheckpointInfo(iteration, int(common.get("consumed_samples", 0)), metadata), common


def _check_finite(ckpt: ShardedCheckpoint, params: dict, root: str, iteration: int, load_optim: bool) -> None:
    """Every saved piece this load uses is finite (the moments only when they are loaded; the
    master always, the weights follow it), checked on the pieces as read, before any is used."""
    for payload in ckpt.payloads:
        for name in params:
            entry = payload["model"].get(name)
            if entry is not None and not all_finite(entry["tensor"]):
                _refuse_non_finite(root, iteration, f"parameter {name}")
            for key in OPTIMIZER_KEYS if load_optim else ("master",):
                state = payload["optimizer"].get(name, {}).get(key)
                if state is not None and not all_finite(state):
                    _refuse_non_finite(root, iteration, f"the optimizer's {key} of {name}")


def _checked_local_states(ckpt: ShardedCheckpoint, name: str, layout: ParamLayout, ps: ParallelState,
                          same_layout: bool, folder: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    try:
        return _local_states(ckpt, name, layout, ps, same_layout)
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: the saved pieces of {name} do not fit together ({first_line(exc)}); "
                              f"a rank file is damaged - load another checkpoint") from None


def _check_common(path: Path, common) -> None:
    if not isinstance(common, dict):
        raise CheckpointError(f"{path} holds a {type(common).__name__}, not the run state of this framework; the "
                              f"checkpoint is damaged - load another one")
    for key in ("iteration", "consumed_samples", "skipped_iterations"):
        if key in common and not (is_int(common[key]) and common[key] >= 0):
            raise CheckpointError(f"{path} is damaged ({key} is {common[key]!r}, not a count); load another checkpoint")
