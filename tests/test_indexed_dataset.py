"""The .bin/.idx format: exact layout, round trip, atomic writing, and detection of damaged files."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import (
    HEADER_BYTES, MAGIC, TRAILER_BYTES, TRAILER_MAGIC, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter,
    bin_path, idx_path, token_dtype_for_vocab,
)


def _write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
        writer.finalize()
    return IndexedDataset(prefix)


def _random_documents(seed=0, count=50, high=65000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=rng.integers(0, 30)) for _ in range(count)]


def test_dtype_follows_vocab_size():
    assert token_dtype_for_vocab(50257) is np.uint16
    assert token_dtype_for_vocab(65499) is np.uint16
    assert token_dtype_for_vocab(65500) is np.int32
    assert token_dtype_for_vocab(128256) is np.int32


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65535), (np.int32, 200_000)])
def test_round_trip(tmp_path, dtype, high):
    documents = _random_documents(high=high) + [[]]
    dataset = _write(tmp_path / "ds", documents, dtype)
    assert len(dataset) == dataset.num_documents == len(documents)
    assert dataset.dtype is dtype
    assert dataset.num_tokens == sum(len(d) for d in documents)
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[i], document)
        assert dataset[i].dtype == dtype
    np.testing.assert_array_equal(dataset[-1], documents[-1])
    np.testing.assert_array_equal(dataset.get(3, offset=2, length=4), documents[3][2:6])
    np.testing.assert_array_equal(dataset.document_lengths, [len(d) for d in documents])
    with pytest.raises(IndexError):
        dataset[len(documents)]
    held = dataset[1]
    dataset.close()  # arrays already handed out stay valid
    np.testing.assert_array_equal(held, documents[1])
    dataset = IndexedDataset(tmp_path / "ds")
    restored = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    np.testing.assert_array_equal(restored[7], documents[7])


def test_layout_matches_megatron(tmp_path):
    documents = [[1, 2, 3], [], [70000, 5]]
    _write(tmp_path / "ds", documents, np.int32)
    index = idx_path(tmp_path / "ds").read_bytes()
    magic, version, code, num_sequences, num_document_entries = struct.unpack_from("<9sQBQQ", index)
    assert (magic, version, code, num_sequences, num_document_entries) == (MAGIC, 1, 4, 3, 4)
    body = np.frombuffer(index, np.uint8, offset=HEADER_BYTES)
    assert body[:12].view(np.int32).tolist() == [3, 0, 2]
    assert body[12:36].view(np.int64).tolist() == [0, 12, 12]  # byte offsets into .bin
    assert body[36:68].view(np.int64).tolist() == [0, 1, 2, 3]
    # Then our trailer (which Megatron-LM's reader, reading at these offsets, never sees).
    assert len(body) == 68 + TRAILER_BYTES and bytes(body[68:76]) == TRAILER_MAGIC
    assert body[84:108].view(np.int64).tolist() == [20, 1, 70000]  # .bin bytes, the token range
    assert bin_path(tmp_path / "ds").read_bytes() == np.array([1, 2, 3, 70000, 5], np.int32).tobytes()
    _write(tmp_path / "u16", documents[:2], np.uint16)
    assert struct.unpack_from("<9sQB", idx_path(tmp_path / "u16").read_bytes())[2] == 8


def test_documents_of_several_sequences(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
        writer.add_document([1, 2, 3, 4, 5], sequence_lengths=[2, 3])
        writer.add_document([6])
        writer.finalize()
    dataset = IndexedDataset(tmp_path / "ds")
    assert len(dataset) == 3 and dataset.num_documents == 2
    assert dataset.document_indices.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(dataset[1], [3, 4, 5])
    np.testing.assert_array_equal(dataset.get_document(0), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(dataset.document_lengths, [5, 1])


def test_bulk_add_equals_one_by_one(tmp_path):
    documents = _random_documents(seed=3)
    _write(tmp_path / "single", documents)
    with IndexedDatasetWriter(tmp_path / "bulk", np.uint16) as writer:
        writer.add_documents(np.concatenate(documents), np.array([len(d) for d in documents]))
        writer.finalize()
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"bulk{suffix}").read_bytes() == (tmp_path / f"single{suffix}").read_bytes()


def test_failed_write_leaves_nothing_and_keeps_old_files(tmp_path):
    _write(tmp_path / "ds", [[1, 2, 3]])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
            writer.add_document([9, 9])
            raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_token_outside_dtype_is_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
        with pytest.raises(ValueError, match="outside the range of uint16"):
            writer.add_document([1, 70000])
    assert list(tmp_path.iterdir()) == []


def _damage(prefix, which, edit):
    path = idx_path(prefix) if which == "idx" else bin_path(prefix)
    path.write_bytes(edit(bytearray(path.read_bytes())))


def _set(offset, value):
    def edit(data):
        data[offset:offset + len(value)] = value
        return data
    return edit


@pytest.mark.parametrize("which, edit, problem", [
    ("idx", _set(0, b"XXXX"), "bad magic"),
    ("idx", _set(9, struct.pack("<Q", 2)), "version 2"),
    ("idx", _set(17, b"\x63"), "unknown token dtype code 99"),
    ("idx", lambda d: d[:-5], "truncated"),
    ("idx", lambda d: d[:20], "shorter than the 34-byte header"),
    ("idx", lambda d: d + b"\0" * 8, "header describes"),
    ("idx", _set(HEADER_BYTES, struct.pack("<i", 4)), "pointers do not match"),
    ("idx", _set(HEADER_BYTES, struct.pack("<i", -1)), "negative sequence length"),
    ("idx", lambda d: d[:-8 - TRAILER_BYTES] + struct.pack("<q", 7) + d[-TRAILER_BYTES:], "end at the sequence count"),
    ("idx", lambda d: d[:-1] + bytes([d[-1] ^ 1]), "does not match its .idx"),  # the trailer's fingerprint
    ("idx", lambda d: d[:-TRAILER_BYTES + 16] + struct.pack("<Q", 99) + d[-TRAILER_BYTES + 24:],
     "does not match its .idx"),  # the trailer's .bin size
    ("bin", lambda d: d[:-2], "truncated or mismatched"),
    ("bin", lambda d: d + b"\0\0", "truncated or mismatched"),
])
def test_damaged_files_are_detected(tmp_path, which, edit, problem):
    _write(tmp_path / "ds", [[1, 2, 3], [4, 5], [6]])
    _damage(tmp_path / "ds", which, edit)
    with pytest.raises(IndexedDatasetError, match=problem) as error:
        IndexedDataset(tmp_path / "ds")
    assert str(tmp_path / "ds") in str(error.value) and "tools/preprocess_data.py" in str(error.value)


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file_names_the_fix(tmp_path, missing):
    _write(tmp_path / "ds", [[1]])
    (tmp_path / f"ds{missing}").unlink()
    with pytest.raises(IndexedDatasetError, match=f"ds{missing}: not found; check --data-path"):
        IndexedDataset(tmp_path / "ds")
