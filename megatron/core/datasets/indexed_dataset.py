"""Memory-mapped token datasets in Megatron's `.bin` / `.idx` layout.

`.bin` holds the token ids of every sequence back to back. `.idx` (all little-endian):

    magic              9 bytes  b"MMIDIDX\\x00\\x00"
    version            uint64   1
    dtype code         uint8    1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count     uint64   S
    document count     uint64   D + 1 (the entries of `document_indices` below)
    sequence_lengths   int32[S]      tokens per sequence
    sequence_pointers  int64[S]      byte offset of each sequence in `.bin`
    document_indices   int64[D + 1]  index of each document's first sequence, then S

The layout (and the dtype codes) match Megatron-LM's MMapIndexedDataset, so files written by either
are read by the other. Our preprocessing writes one sequence per document (no sentence splitting),
so `dataset[i]` is document i; Megatron-LM's writes an empty record kept with `--keep-empty` as a
document of no sequences, which `get_document` returns as an empty array.

Our writer appends a trailer after those arrays, which Megatron-LM's reader never looks at:

    magic              8 bytes  b"FP8LMIDX"
    version            uint64   1
    bin bytes          uint64   size of the `.bin` this index was written with
    min / max token    int64 x2 smallest and largest token id (max < min: no tokens)
    bin fingerprint    32 bytes sha256 of the `.bin` size and 64 sampled 4 KiB blocks

so that a `.bin` / `.idx` pair that do not belong together is refused even when their sizes agree,
and the data's token range is known without reading the data. An index without the trailer
(Megatron-LM's, or written before it existed) still loads; its token range is then scanned once
and cached (`token_range`).
"""

from __future__ import annotations

import array
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
HEADER_BYTES = _HEADER.size
TRAILER_MAGIC = b"FP8LMIDX"
TRAILER_VERSION = 1
_TRAILER = struct.Struct("<8sQQqq32s")
TRAILER_BYTES = _TRAILER.size
_SAMPLE_BLOCKS, _SAMPLE_BLOCK_BYTES = 64, 4096
# Where the scanned token range of an index without a trailer is cached: beside the sample indices.
DEFAULT_CACHE_SUBDIR = Path("cache") / "GPTDataset_indices"
_SCAN_TOKENS = 1 << 26

DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}

# Megatron's threshold: a little headroom below 2**16 for ids that tokenizers add later.
_UINT16_VOCAB_LIMIT = 65500
_CHECK_CHUNK = 1 << 22


class IndexedDatasetError(ValueError):
    """A `.bin` / `.idx` pair that is missing, truncated or corrupt."""


def token_dtype_for_vocab(vocab_size: int) -> type[np.integer]:
    return np.uint16 if vocab_size < _UINT16_VOCAB_LIMIT else np.int32


def bin_path(path_prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path_prefix)}.bin")


def idx_path(path_prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path_prefix)}.idx")


def dataset_exists(path_prefix: str | os.PathLike) -> bool:
    return bin_path(path_prefix).is_file() and idx_path(path_prefix).is_file()


class IndexedDataset:
    """Read-only view of a `.bin` / `.idx` pair; validates both files when opened."""

    def __init__(self, path_prefix: str | os.PathLike) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self._open()

    def _open(self) -> None:
        for path in (idx_path(self.path_prefix), bin_path(self.path_prefix)):
            if not path.is_file():
                raise IndexedDatasetError(
                    f"{path}: not found; check --data-path (give the prefix without .bin/.idx) "
                    "or build it with tools/preprocess_data.py"
                )
        index = _read_index(idx_path(self.path_prefix))
        self.dtype, self.sequence_lengths, self.sequence_pointers, self.document_indices, self._trailer = index
        self._token_bytes = np.dtype(self.dtype).itemsize
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        self._check_bin_size()
        self._check_fingerprint()
        self._bin_file = open(bin_path(self.path_prefix), "rb")
        # mmap refuses empty files; a dataset of empty documents simply has no bytes to map.
        self._bin_buffer = (
            mmap.mmap(self._bin_file.fileno(), 0, access=mmap.ACCESS_READ) if self.num_tokens else b""
        )

    def _check_bin_size(self) -> None:
        expected = self.num_tokens * self._token_bytes
        actual = bin_path(self.path_prefix).stat().st_size
        if actual != expected:
            raise IndexedDatasetError(
                f"{bin_path(self.path_prefix)}: {actual} bytes but its .idx describes {expected}; "
                "the pair is truncated or mismatched, rebuild it with tools/preprocess_data.py"
            )

    def _check_fingerprint(self) -> None:
        """The `.bin` is the one the trailer's index was written for (an interrupted or mixed-up
        preprocessing run can pair a new `.bin` with an old `.idx` of the same size)."""
        if self._trailer is None:
            return
        path = bin_path(self.path_prefix)
        if self._trailer["bin_bytes"] != path.stat().st_size or self._trailer["fingerprint"] != bin_fingerprint(path):
            raise IndexedDatasetError(
                f"{path} does not match its .idx (the pair is mismatched: the index was written for other data, by "
                "an interrupted or mixed-up preprocessing run, or one of them is damaged); rebuild it with "
                "tools/preprocess_data.py"
            )

    def token_range(self, cache_dir: str | os.PathLike | None = None) -> tuple[int, int] | None:
        """(smallest, largest) token id, None without tokens: from the trailer, else scanned once
        and cached in `cache_dir` (default: cache/GPTDataset_indices beside the data) under the
        files' sizes and modification times."""
        if self._trailer is not None:
            low, high = self._trailer["min_token"], self._trailer["max_token"]
            return None if high < low else (low, high)
        if self.num_tokens == 0:
            return None
        cache = Path(cache_dir) if cache_dir else Path(self.path_prefix).parent / DEFAULT_CACHE_SUBDIR
        key = hashlib.md5(os.path.abspath(self.path_prefix).encode()).hexdigest()
        cache_file = cache / f"{key}-token_range.json"
        stamp = _file_stamp(self.path_prefix)
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("stamp") == stamp:
                return int(cached["min"]), int(cached["max"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no cache, or a damaged one: scan the tokens below and rewrite it
        low, high = self._scan_token_range()
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"path": os.path.abspath(self.path_prefix), "stamp": stamp,
                                       "min": low, "max": high}))
            os.replace(tmp, cache_file)
        except OSError:  # an unwritable cache folder only costs a scan next time
            pass
        return low, high

    def _scan_token_range(self) -> tuple[int, int]:
        low, high = None, None
        for start in range(0, self.num_tokens, _SCAN_TOKENS):
            count = min(_SCAN_TOKENS, self.num_tokens - start)
            chunk = np.frombuffer(self._bin_buffer, dtype=self.dtype, count=count, offset=start * self._token_bytes)
            chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
            low = chunk_low if low is None else min(low, chunk_low)
            high = chunk_high if high is None else max(high, chunk_high)
        return low, high

    def check_token_ids(self, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> None:
        """Refuse data with token ids outside a tokenizer of `vocab_size` ids (data tokenized with
        another tokenizer): cheap, from `token_range`."""
        if np.dtype(self.dtype).kind not in "iu":
            return
        token_range = self.token_range(cache_dir)
        if token_range is None:
            return
        low, high = token_range
        if low < 0 or high >= vocab_size:
            raise IndexedDatasetError(
                f"{bin_path(self.path_prefix)}: token ids run from {low} to {high}, but the tokenizer has "
                f"{vocab_size} ids (0 to {vocab_size - 1}); the data was made with another tokenizer - pass that "
                "one's --tokenizer-* flags, or rebuild the data with tools/preprocess_data.py and this tokenizer"
            )

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64), whatever the number of sequences in each."""
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(ends[self.document_indices])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences in {self.path_prefix}")
        return self.get(index % len(self))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `index`, as a read-only view of the map."""
        sequence_length = int(self.sequence_lengths[index])
        if length is None:
            length = sequence_length - offset
        assert 0 <= offset and offset + length <= sequence_length, (index, offset, length)
        start = int(self.sequence_pointers[index]) + offset * self._token_bytes
        return np.frombuffer(self._bin_buffer, dtype=self.dtype, count=length, offset=start)

    def get_document(self, document: int) -> np.ndarray:
        """The tokens of every sequence of `document`; empty for a document of no sequences (what
        Megatron-LM's preprocessing writes for an empty record kept with --keep-empty)."""
        first, end = int(self.document_indices[document]), int(self.document_indices[document + 1])
        if end - first == 1:
            return self.get(first)
        if end == first:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate([self.get(i) for i in range(first, end)]).astype(self.dtype)

    def close(self) -> None:
        if isinstance(self._bin_buffer, mmap.mmap):
            try:
                self._bin_buffer.close()
            except BufferError:  # arrays handed out still view the map; it closes when they are gone
                pass
        self._bin_file.close()

    # DataLoader workers started with "spawn" receive a pickled copy; maps cannot be pickled.
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()


def _file_stamp(path_prefix: str) -> dict:
    stats = [os.stat(p) for p in (idx_path(path_prefix), bin_path(path_prefix))]
    return {"idx_bytes": stats[0].st_size, "idx_mtime_ns": stats[0].st_mtime_ns,
            "bin_bytes": stats[1].st_size, "bin_mtime_ns": stats[1].st_mtime_ns}


def bin_fingerprint(path: Path) -> bytes:
    """sha256 of a `.bin`'s size and of 64 blocks of 4 KiB spread evenly over it (first and last
    included; all of it when it is smaller): a few reads, whatever the size of the data."""
    size = path.stat().st_size
    digest = hashlib.sha256(struct.pack("<Q", size))
    with open(path, "rb") as data:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES:
            digest.update(data.read())
        else:
            for block in range(_SAMPLE_BLOCKS):
                data.seek(block * (size - _SAMPLE_BLOCK_BYTES) // (_SAMPLE_BLOCKS - 1))
                digest.update(data.read(_SAMPLE_BLOCK_BYTES))
    return digest.digest()


def _read_index(path: Path) -> tuple[type, np.ndarray, np.ndarray, np.ndarray, dict | None]:
    # Mapped, not read: every rank and DataLoader worker on a node then shares one copy in the page cache.
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise _corrupt(path, f"{size} bytes, shorter than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as index_file:
        content = mmap.mmap(index_file.fileno(), 0, access=mmap.ACCESS_READ)
    magic, version, dtype_code, num_sequences, num_document_entries = _HEADER.unpack_from(content)
    if magic != MAGIC:
        raise _corrupt(path, "not a Megatron indexed dataset index (bad magic bytes)")
    if version != VERSION:
        raise _corrupt(path, f"index version {version}, this reader knows version {VERSION}")
    if dtype_code not in DTYPE_CODES:
        raise _corrupt(path, f"unknown token dtype code {dtype_code}")
    expected_size = HEADER_BYTES + 12 * num_sequences + 8 * num_document_entries
    trailer = None
    if size == expected_size + TRAILER_BYTES and content[expected_size:expected_size + 8] == TRAILER_MAGIC:
        trailer = _read_trailer(path, content, expected_size)
    elif size != expected_size:
        raise _corrupt(path, f"{size} bytes but its header describes {expected_size} (truncated?)")
    lengths = np.frombuffer(content, np.int32, num_sequences, HEADER_BYTES)
    pointers = np.frombuffer(content, np.int64, num_sequences, HEADER_BYTES + 4 * num_sequences)
    documents = np.frombuffer(content, np.int64, num_document_entries, HEADER_BYTES + 12 * num_sequences)
    dtype = DTYPE_CODES[dtype_code]
    _check_index_arrays(path, lengths, pointers, documents, np.dtype(dtype).itemsize)
    return dtype, lengths, pointers, documents, trailer


def _read_trailer(path: Path, content, offset: int) -> dict:
    _, version, bin_bytes, min_token, max_token, fingerprint = _TRAILER.unpack_from(content, offset)
    if version != TRAILER_VERSION:
        raise _corrupt(path, f"index trailer version {version}, this reader knows version {TRAILER_VERSION}")
    return {"bin_bytes": bin_bytes, "min_token": min_token, "max_token": max_token, "fingerprint": fingerprint}


def _check_index_arrays(path: Path, lengths, pointers, documents, token_bytes: int) -> None:
    if (lengths < 0).any():
        raise _corrupt(path, "negative sequence length")
    if len(lengths) and pointers[0] != 0:
        raise _corrupt(path, "sequence pointers do not match the sequence lengths")
    # In chunks: a corpus of 10^8 documents would otherwise need several GB of temporaries here.
    for start in range(0, max(len(lengths) - 1, 0), _CHECK_CHUNK):
        end = min(start + _CHECK_CHUNK, len(lengths) - 1)
        steps = np.diff(pointers[start:end + 1])
        if not np.array_equal(steps, lengths[start:end].astype(np.int64) * token_bytes):
            raise _corrupt(path, "sequence pointers do not match the sequence lengths")
    if len(documents) == 0 or documents[0] != 0 or documents[-1] != len(lengths):
        raise _corrupt(path, "document indices must start at 0 and end at the sequence count")
    if (np.diff(documents) < 0).any():
        raise _corrupt(path, "document indices are not in order")


def _corrupt(path: Path, problem: str) -> IndexedDatasetError:
    return IndexedDatasetError(f"{path}: corrupt index, {problem}; rebuild it with tools/preprocess_data.py")


class IndexedDatasetWriter:
    """Writes a `.bin` / `.idx` pair under temporary names; `finalize()` renames both into place.

    Use as a context manager: leaving the block without `finalize()` (an error, Ctrl-C) deletes
    the temporary files, so a failed run never leaves a half-written dataset or touches an old one.
    """

    def __init__(self, path_prefix: str | os.PathLike, dtype: type[np.integer]) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"token dtype {self.dtype} has no .idx code; use uint16 or int32")
        self._dtype_info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = Path(f"{bin_path(self.path_prefix)}{suffix}")
        self._tmp_idx = Path(f"{idx_path(self.path_prefix)}{suffix}")
        self._bin_file = open(self._tmp_bin, "wb")
        # Typed arrays, not lists: 10^8 documents cost 1.2 GB here instead of several GB of Python ints.
        self._sequence_lengths = array.array("i")
        self._document_indices = array.array("q", [0])
        self._min_token, self._max_token = 0, -1  # no tokens yet
        self._finished = False

    def add_document(self, tokens: np.ndarray | list[int], sequence_lengths: list[int] | None = None) -> None:
        """Append one document; `sequence_lengths` splits it into sentences (default: one sequence)."""
        array = np.asarray(tokens)
        self._check_range(array)
        lengths = [len(array)] if sequence_lengths is None else list(sequence_lengths)
        assert sum(lengths) == len(array), "sequence lengths must cover the document exactly"
        self._bin_file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sequence_lengths.extend(lengths)
        self._document_indices.append(len(self._sequence_lengths))

    def add_documents(self, tokens: np.ndarray, document_lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: their tokens back to back, and their lengths."""
        array = np.asarray(tokens)
        self._check_range(array)
        assert int(np.sum(document_lengths)) == len(array), "document lengths must cover the tokens exactly"
        self._bin_file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        first = len(self._sequence_lengths)
        self._sequence_lengths.frombytes(np.asarray(document_lengths, dtype=np.int32).tobytes())
        new_documents = np.arange(first + 1, len(self._sequence_lengths) + 1, dtype=np.int64)
        self._document_indices.frombytes(new_documents.tobytes())

    def _check_range(self, array: np.ndarray) -> None:
        if array.size == 0:
            return
        low, high = array.min(), array.max()
        if self._dtype_info is not None and (low < self._dtype_info.min or high > self._dtype_info.max):
            raise ValueError(
                f"token id outside the range of {self.dtype} in {self.path_prefix}; "
                "the tokenizer's vocabulary is larger than the dtype chosen for it"
            )
        if self._dtype_info is not None:  # the token range the trailer records
            first = self._max_token < self._min_token
            self._min_token = int(low) if first else min(self._min_token, int(low))
            self._max_token = int(high) if first else max(self._max_token, int(high))

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def finalize(self) -> None:
        self._bin_file.flush()
        os.fsync(self._bin_file.fileno())
        self._bin_file.close()
        lengths = np.frombuffer(self._sequence_lengths, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * self.dtype.itemsize
        with open(self._tmp_idx, "wb") as index_file:
            index_file.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths),
                                          len(self._document_indices)))
            index_file.write(lengths.tobytes())
            index_file.write(pointers[: len(lengths)].astype(np.int64).tobytes())
            index_file.write(np.frombuffer(self._document_indices, dtype=np.int64).tobytes())
            index_file.write(_TRAILER.pack(TRAILER_MAGIC, TRAILER_VERSION, self._tmp_bin.stat().st_size,
                                           self._min_token, self._max_token, bin_fingerprint(self._tmp_bin)))
            index_file.flush()
            os.fsync(index_file.fileno())
        # The old .idx goes first: a kill between the renames leaves a .bin without its .idx (refused
        # as missing), never the new .bin beside the old .idx; and the new .idx, renamed last,
        # always finds its .bin.
        idx_path(self.path_prefix).unlink(missing_ok=True)
        os.replace(self._tmp_bin, bin_path(self.path_prefix))
        os.replace(self._tmp_idx, idx_path(self.path_prefix))
        self._finished = True

    def abort(self) -> None:
        self._bin_file.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)
        self._finished = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._finished:
            self.abort()
