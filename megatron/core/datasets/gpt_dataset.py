"""GPT training samples: windows of `seq_length + 1` tokens that run across document boundaries.

Three index arrays describe the samples of one dataset split (here "document" means one sequence of
the `.idx`; our preprocessing writes one per document):

  document_index  the split's documents, one seeded permutation per epoch, epochs back to back
  sample_index    [num_samples + 1, 2]: (position in document_index, token offset) where sample i
                  starts; sample i ends on the token where sample i + 1 starts (labels overlap by one)
  shuffle_index   the order in which samples are served

They are a pure function of (document lengths, split, num_samples, seq_length, seed). They are
built once with numpy, cached as .npy files next to the data, and rebuilt when the data changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset, bin_path, idx_path

logger = logging.getLogger(__name__)

# Samples of a last, partial epoch are shuffled apart from the full epochs (as Megatron does) when
# it would be used less than this much, so every document of the full epochs comes first.
_SEPARATE_LAST_EPOCH_BELOW = 0.8
_CACHE_FORMAT = 1
_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


def split_ranges(num_documents: int, split_weights: tuple[float, ...]) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges for train / valid / test (weights sum to 1)."""
    bounds = np.rint(np.cumsum([0.0, *split_weights]) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(split_weights))]


def build_sample_indices(document_lengths: np.ndarray, document_ids: np.ndarray, num_samples: int,
                         seq_length: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (document_index, sample_index, shuffle_index) of the module docstring."""
    tokens_per_epoch = int(document_lengths[document_ids].sum(dtype=np.int64))
    if tokens_per_epoch == 0:
        raise ValueError("the documents of this split hold no tokens; use more data or another --split")
    num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
    if num_epochs * len(document_ids) >= 2**33:  # tens of GB of index: surely a mistake in the sizes
        raise ValueError(f"{num_samples} samples of {seq_length} tokens would need {num_epochs} epochs of this "
                         "split; use more data, fewer samples or another --split")
    # RandomState, not Generator: its streams are frozen across numpy versions, so indices built on
    # one machine match those built on another.
    rng = np.random.RandomState(seed)
    document_index = np.concatenate([rng.permutation(document_ids) for _ in range(num_epochs)])
    document_index = document_index.astype(_index_dtype(int(document_ids.max()) + 1))
    sample_index = _sample_starts(document_lengths[document_index], num_samples, seq_length,
                                  _index_dtype(len(document_index) + 1))
    shuffle_index = _shuffle(rng, num_samples, _samples_before_last_epoch(
        num_epochs, tokens_per_epoch, num_samples, seq_length))
    return document_index, sample_index, shuffle_index


def _sample_starts(lengths_in_order: np.ndarray, num_samples: int, seq_length: int, dtype) -> np.ndarray:
    document_starts = np.concatenate([[0], np.cumsum(lengths_in_order, dtype=np.int64)])
    token_positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" lands on the last document starting at or before the position, which skips
    # empty documents (they start where the next one starts).
    positions_in_index = np.searchsorted(document_starts, token_positions, side="right") - 1
    offsets = token_positions - document_starts[positions_in_index]
    return np.stack([positions_in_index, offsets], axis=1).astype(dtype)


def _samples_before_last_epoch(num_epochs: int, tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    if num_epochs == 1:
        return 0
    full_epoch_samples = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    samples_per_epoch = max((tokens_per_epoch - 1) // seq_length, 1)
    last_epoch_share = (num_samples - full_epoch_samples) / samples_per_epoch
    return full_epoch_samples if last_epoch_share < _SEPARATE_LAST_EPOCH_BELOW else 0


def _shuffle(rng: np.random.RandomState, num_samples: int, num_first: int) -> np.ndarray:
    dtype = _index_dtype(num_samples)
    first = rng.permutation(num_first).astype(dtype)
    rest = (num_first + rng.permutation(num_samples - num_first)).astype(dtype)
    return np.concatenate([first, rest])


def _index_dtype(count: int):
    return np.int32 if count < 2**31 - 1 else np.int64


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one indexed dataset, served in a seeded shuffled order.

    Each item is a dict of torch tensors of length seq_length: `tokens`, `labels` (tokens shifted
    by one), `loss_mask` (float, 0 where the input is EOD if `eod_mask_loss`) and `position_ids`.
    """

    def __init__(self, indexed: IndexedDataset, *, document_range: tuple[int, int], num_samples: int,
                 seq_length: int, seed: int, split_name: str = "train", cache_dir: str | os.PathLike | None = None,
                 eod_id: int | None = None, eod_mask_loss: bool = False) -> None:
        start, end = document_range
        if not 0 <= start < end <= len(indexed):
            raise ValueError(f"{split_name} split of {indexed.path_prefix} has no documents ({start}:{end}); "
                             "use more data or change --split")
        if num_samples < 1 or seq_length < 1:
            raise ValueError("a GPTDataset needs num_samples >= 1 and seq_length >= 1")
        if eod_mask_loss and eod_id is None:
            raise ValueError("--eod-mask-loss needs the tokenizer's EOD id")
        self.indexed = indexed
        self.document_range, self.num_samples, self.seq_length, self.seed = (start, end), num_samples, seq_length, seed
        self.split_name, self.eod_id, self.eod_mask_loss = split_name, eod_id, eod_mask_loss
        self.cache_dir = Path(cache_dir) if cache_dir else Path(indexed.path_prefix).parent / "cache" / "GPTDataset_indices"
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build_indices()

    # ------------------------------------------------------------------ indices and their cache

    def _description(self) -> dict:
        return {
            "class": "GPTDataset", "format": _CACHE_FORMAT, "path_prefix": os.path.abspath(self.indexed.path_prefix),
            "split": self.split_name, "document_range": list(self.document_range),
            "num_samples": self.num_samples, "seq_length": self.seq_length, "seed": self.seed,
        }

    def _fingerprint(self) -> dict:
        # Regenerating the data changes size or mtime; the cached indices then no longer apply.
        stats = [os.stat(p) for p in (idx_path(self.indexed.path_prefix), bin_path(self.indexed.path_prefix))]
        return {"idx_bytes": stats[0].st_size, "idx_mtime_ns": stats[0].st_mtime_ns,
                "bin_bytes": stats[1].st_size, "bin_mtime_ns": stats[1].st_mtime_ns}

    def _cache_paths(self) -> dict[str, Path]:
        description = json.dumps(self._description(), sort_keys=True)
        key = hashlib.md5(description.encode()).hexdigest()
        stem = f"{key}-GPTDataset-{self.split_name}"
        paths = {name: self.cache_dir / f"{stem}-{name}.npy" for name in _INDEX_NAMES}
        paths["description"] = self.cache_dir / f"{stem}-description.json"
        return paths

    def _load_or_build_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        paths = self._cache_paths()
        cached = self._load_cached(paths)
        if cached is not None:
            return cached
        started = time.perf_counter()
        indices = build_sample_indices(
            self.indexed.sequence_lengths, np.arange(*self.document_range, dtype=np.int64),
            self.num_samples, self.seq_length, self.seed)
        logger.info("built %s indices for %s (%d samples) in %.2f s", self.split_name,
                    self.indexed.path_prefix, self.num_samples, time.perf_counter() - started)
        self._save_cached(paths, indices)
        return indices

    def _load_cached(self, paths: dict[str, Path]):
        try:
            saved = json.loads(paths["description"].read_text())
            if saved.get("fingerprint") != self._fingerprint() or saved.get("description") != self._description():
                return None
            indices = tuple(np.load(paths[name], mmap_mode="r") for name in _INDEX_NAMES)
        except (OSError, ValueError):
            return None
        document_index, sample_index, shuffle_index = indices
        if sample_index.shape != (self.num_samples + 1, 2) or shuffle_index.shape != (self.num_samples,):
            return None
        return indices

    def _save_cached(self, paths: dict[str, Path], indices) -> None:
        # Every file goes in under a temporary name; the description, written last, marks the set complete.
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for name, array in zip(_INDEX_NAMES, indices):
                _replace_file(paths[name], lambda f, a=array: np.save(f, a, allow_pickle=False))
            record = {"description": self._description(), "fingerprint": self._fingerprint()}
            _replace_file(paths["description"], lambda f: f.write(json.dumps(record, indent=1).encode()))
        except OSError as exc:
            logger.warning("cannot cache dataset indices in %s (%s); keeping them in memory", self.cache_dir, exc)

    # ------------------------------------------------------------------ samples

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, index: int) -> np.ndarray:
        """The seq_length + 1 token ids of sample `index` (in served order), as int64."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        sample = int(self.shuffle_index[index])
        (first, first_offset), (last, last_offset) = self.sample_index[sample], self.sample_index[sample + 1]
        first, first_offset, last, last_offset = int(first), int(first_offset), int(last), int(last_offset)
        document_ids = self.document_index
        if first == last:
            pieces = [self.indexed.get(int(document_ids[first]), first_offset, last_offset - first_offset + 1)]
        else:
            pieces = [self.indexed.get(int(document_ids[first]), first_offset)]
            pieces += [self.indexed.get(int(document_ids[i])) for i in range(first + 1, last)]
            pieces.append(self.indexed.get(int(document_ids[last]), 0, last_offset + 1))
        tokens = np.concatenate(pieces).astype(np.int64)
        assert len(tokens) == self.seq_length + 1, (index, len(tokens))
        return tokens

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.sample_tokens(int(index)))
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod_id] = 0.0
        position_ids = torch.arange(self.seq_length, dtype=torch.int64)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def _replace_file(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
