"""What `megatron.core.checkpointing` checks before it trusts a checkpoint: the manifest (every
file's size and sha256, written into the iteration folder before it is renamed into place), the
metadata's and the rank files' structure, and that loaded values are finite.

Costs, measured on 2 CPU cores with a 512 MB rank file in the page cache: `torch.load` 0.42 s,
sha256 0.6 s (~0.9 GB/s; `torch.load` holds the GIL, so the hashing thread overlaps little and a
verified load took 0.98 s), `torch.aminmax` over every tensor 0.1 s. A save hashes each rank file
once, on its own rank (in parallel across ranks). Loading always checks sizes (a stat per file)
and by default the sha256 of every file a rank reads: about twice the CPU time of the load for
the rank files, worth it against silent corruption; `verify_checksums=False` skips it (a
`--no-verify-checkpoint-checksums` flag can pass it) and still checks sizes, structure and values.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_HASH_BLOCK = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----- the manifest -----------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def write_manifest(folder: Path, known: dict | None = None) -> None:
    """`folder`/manifest.json listing every file in it (not hidden ones): the record in `known`
    where a rank already hashed its file, else hashed here. Written atomically."""
    known = known or {}
    files = {entry.name: known.get(entry.name) or file_record(entry) for entry in sorted(Path(folder).iterdir())
             if entry.is_file() and not entry.name.startswith(".") and entry.name != MANIFEST}
    data = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1).encode()
    tmp = Path(folder) / f".{MANIFEST}.tmp"
    with open(tmp, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, Path(folder) / MANIFEST)


def read_manifest(folder: Path) -> dict | None:
    """{file name: {"bytes", "sha256"}} of a checkpoint folder; None for one saved before manifests."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSON and UTF-8 decoding
        raise CheckpointError(f"{path} is unreadable ({first_line(exc)}); the checkpoint is damaged - load another "
                              f"one") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    records_ok = isinstance(files, dict) and all(
        isinstance(r, dict) and is_int(r.get("bytes")) and isinstance(r.get("sha256"), str) for r in files.values())
    if not records_ok:
        raise CheckpointError(f"{path} does not list the checkpoint's files with their sizes and sha256; the "
                              f"checkpoint is damaged - load another one")
    return files


def check_file_sizes(folder: Path, manifest: dict | None, names=None) -> None:
    """Every file the manifest lists (or those of `names` it lists) is there with its size
    (truncated or partial copies)."""
    for name, record in (manifest or {}).items():
        if names is not None and name not in names:
            continue
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, load another one")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(f"{path} cannot be loaded safely: it has {size} bytes, its {MANIFEST} records "
                                  f"{record['bytes']}; it is damaged or truncated - copy it again or load another "
                                  f"checkpoint")


def checksum_mismatch(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} cannot be loaded safely: its sha256 differs from the one its {MANIFEST} records; "
                           f"it is damaged - copy it again or load another checkpoint")


class BackgroundHash:
    """sha256 of a file computed in a thread (hashlib releases the GIL), while the caller reads it."""

    def __init__(self, path: Path):
        self.path, self.digest, self.error = path, None, None
        self.thread = threading.Thread(target=self._run, name=f"sha256 {path.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.digest = sha256_of(self.path)
        except OSError as exc:
            self.error = exc

    def matches(self, expected: str) -> bool:
        self.thread.join()
        return self.error is not None or self.digest == expected  # an unreadable file fails its load instead


# ----- structure --------------------------------------------------------------------------------
def metadata_problem(metadata) -> str | None:
    """What is wrong with a checkpoint's metadata.json, None when nothing is."""
    if not isinstance(metadata, dict):
        return f"a JSON {type(metadata).__name__}, not an object"
    if not is_int(metadata.get("format")):
        return "no integer 'format'"
    layout = metadata.get("layout")
    if not isinstance(layout, dict):
        return "no 'layout' object"
    sizes = {key: layout.get(key) for key in ("world_size", "tp", "pp", "dp")}
    if not all(is_int(v) and v >= 1 for v in sizes.values()):
        return f"'layout' needs positive integers world_size, tp, pp and dp, has {sizes}"
    if sizes["world_size"] != sizes["tp"] * sizes["pp"] * sizes["dp"]:
        return f"'layout' world_size {sizes['world_size']} is not tp x pp x dp"
    for key, kind in (("model", dict), ("fp8_level", str), ("tokenizer", dict)):
        if metadata.get(key) is not None and not isinstance(metadata[key], kind):
            return f"'{key}' is a {type(metadata[key]).__name__}"
    return None


def payload_problem(payload: dict, keys: tuple[str, ...]) -> str | None:
    """What is wrong with the structure of a rank file (`rank_payload`), None when nothing is;
    `keys`: the optimizer states a file may hold."""
    model, optim = payload.get("model"), payload.get("optimizer", {})
    if not isinstance(model, dict) or not isinstance(optim, dict):
        return "no 'model' or 'optimizer' mapping"
    for name, entry in model.items():
        shard = entry.get("shard") if isinstance(entry, dict) else None
        if not isinstance(shard, dict) or not isinstance(entry.get("tensor"), torch.Tensor):
            return f"parameter {name} has no tensor or shard record"
        if not all(is_int(shard.get(k)) for k in ("tp_rank", "tp_size", "parts")) or \
                not (shard.get("dim") is None or is_int(shard.get("dim"))):
            return f"the shard record of {name} is incomplete"
    for name, entry in optim.items():
        bounds = entry.get("range") if isinstance(entry, dict) else None
        if name not in model or not isinstance(bounds, (list, tuple)) or len(bounds) != 2 \
                or not all(is_int(b) for b in bounds):
            return f"the optimizer state of {name} has no valid range"
        if not all(isinstance(entry[k], torch.Tensor) for k in keys if k in entry):
            return f"an optimizer state of {name} is not a tensor"
    if not is_int(payload.get("optimizer_step", 0)) or not isinstance(payload.get("extra_state", {}), dict):
        return "its optimizer step or extra state is damaged"
    return None


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite (min and max propagate NaN)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8 has no reductions on CPU
        tensor = tensor.float()
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))
