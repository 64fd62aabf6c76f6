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
so `dataset[i]` is document i.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
HEADER_BYTES = _HEADER.size

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
        self.dtype, self.sequence_lengths, self.sequence_pointers, self.document_indices = index
        self._token_bytes = np.dtype(self.dtype).itemsize
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        self._check_bin_size()
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
        first, end = self.document_indices[document], self.document_indices[document + 1]
        if end - first == 1:
            return self.get(int(first))
        return np.concatenate([self.get(int(i)) for i in range(first, end)]).astype(self.dtype)

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


def _read_index(path: Path) -> tuple[type, np.ndarray, np.ndarray, np.ndarray]:
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
    if size != expected_size:
        raise _corrupt(path, f"{size} bytes but its header describes {expected_size} (truncated?)")
    lengths = np.frombuffer(content, np.int32, num_sequences, HEADER_BYTES)
    pointers = np.frombuffer(content, np.int64, num_sequences, HEADER_BYTES + 4 * num_sequences)
    documents = np.frombuffer(content, np.int64, num_document_entries, HEADER_BYTES + 12 * num_sequences)
    dtype = DTYPE_CODES[dtype_code]
    _check_index_arrays(path, lengths, pointers, documents, np.dtype(dtype).itemsize)
    return dtype, lengths, pointers, documents


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
        if self._dtype_info is None or array.size == 0:
            return
        if array.min() < self._dtype_info.min or array.max() > self._dtype_info.max:
            raise ValueError(
                f"token id outside the range of {self.dtype} in {self.path_prefix}; "
                "the tokenizer's vocabulary is larger than the dtype chosen for it"
            )

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def finalize(self) -> None:
        self._bin_file.close()
        lengths = np.frombuffer(self._sequence_lengths, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * self.dtype.itemsize
        with open(self._tmp_idx, "wb") as index_file:
            index_file.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths),
                                          len(self._document_indices)))
            index_file.write(lengths.tobytes())
            index_file.write(pointers[: len(lengths)].astype(np.int64).tobytes())
            index_file.write(np.frombuffer(self._document_indices, dtype=np.int64).tobytes())
        # .bin first: a reader that finds the new .idx always finds its .bin.
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
