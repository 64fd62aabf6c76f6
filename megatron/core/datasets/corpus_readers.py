"""Reading raw corpora: JSON lines, JSON arrays, Parquet, plain text, saved Hugging Face datasets.

The main process only splits input into batches of raw records; JSON decoding and field checks
happen in `parse_record`, which the preprocessing workers call, so parsing scales with `--workers`.
Every error names the file and the line (or row) and says how to fix it.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
FILE_SUFFIXES = TEXT_SUFFIXES + tuple(s + ".gz" for s in TEXT_SUFFIXES) + (".parquet",)
TXT_MODES = ("line", "paragraph", "file")
# Small enough to spread a corpus of a few MB evenly over workers, large enough that the
# inter-process traffic per batch does not matter.
_BATCH_BYTES = 1 << 18
_BATCH_ROWS = 512


class CorpusError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "jsonl", "parquet", "txt" or "hf" (a saved datasets.Dataset folder)


@dataclass
class RecordBatch:
    """Consecutive raw records of one source: bytes (a JSON line) or a dict of field values."""

    source: str
    unit: str  # "line", "row" or "item", for error messages
    locations: list[int] = field(default_factory=list)
    payloads: list = field(default_factory=list)
    num_bytes: int = 0


def resolve_sources(input_path: str) -> list[Source]:
    """The files (or the Hugging Face dataset) that `--input` names, in a deterministic order."""
    if any(ch in input_path for ch in "*?["):
        matches = sorted(glob.glob(input_path, recursive=True))
        if not matches:
            raise CorpusError(f"--input {input_path}: no file matches this pattern")
        return [source for match in matches for source in resolve_sources(match)]
    path = Path(input_path)
    if not path.exists():
        raise CorpusError(f"--input {input_path}: no such file or folder")
    if path.is_dir():
        return _sources_in_folder(path)
    return [_source_for_file(path)]


def _sources_in_folder(folder: Path) -> list[Source]:
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise CorpusError(
            f"--input {folder} is a Hugging Face DatasetDict with splits {', '.join(splits)}; "
            f"pass one split, e.g. --input {folder / (splits[0] if splits else 'train')}"
        )
    if (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file():
        return [Source(str(folder), "hf")]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
    if not files:
        raise CorpusError(f"--input {folder}: no {', '.join(FILE_SUFFIXES)} files in this folder")
    return [_source_for_file(p) for p in files]


def _source_for_file(path: Path) -> Source:
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    if name.endswith((".jsonl", ".json")):
        return Source(str(path), "jsonl")
    if name.endswith(".txt"):
        return Source(str(path), "txt")
    if name.endswith(".parquet") and not path.name.endswith(".gz"):
        return Source(str(path), "parquet")
    raise CorpusError(f"--input {path}: unsupported file type; use {', '.join(FILE_SUFFIXES)}")


def check_keys_for_sources(sources: Sequence[Source], keys: Sequence[str]) -> None:
    """Fail before any work when the requested fields cannot exist in the input."""
    for source in sources:
        if source.kind == "txt" and list(keys) != ["text"]:
            raise CorpusError(f"{source.path}: plain text has one field, 'text'; drop --json-keys for .txt input")
        if source.kind == "parquet":
            _check_columns(source.path, _parquet_columns(source.path), keys)


def read_record_batches(sources: Sequence[Source], keys: Sequence[str] | None,
                        txt_mode: str = "line") -> Iterator[RecordBatch]:
    """Raw records, source by source; `keys` None reads every column of Parquet and saved datasets."""
    for source in sources:
        if source.kind == "jsonl":
            yield from _json_batches(source.path)
        elif source.kind == "txt":
            yield from _batched(source.path, "line", _txt_documents(source.path, txt_mode))
        elif source.kind == "parquet":
            yield from _parquet_batches(source.path, keys)
        else:
            yield from _hf_batches(source.path, keys)


def count_records(sources: Sequence[Source]) -> int | None:
    """Rows known without reading the data (Parquet metadata, dataset length); None when unknown."""
    total = 0
    for source in sources:
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(source.path).metadata.num_rows
        elif source.kind == "hf":
            total += len(_load_hf_dataset(source.path))
        else:
            return None
    return total


def record_location(batch: RecordBatch, position: int) -> str:
    """How error messages name record `position` of `batch`: `FILE:LINE`, or `FILE row N` / `item N`."""
    if batch.unit == "line":
        return f"{batch.source}:{batch.locations[position]}"
    return f"{batch.source} {batch.unit} {batch.locations[position]}"


def load_record(batch: RecordBatch, position: int) -> dict:
    """Record `position` of `batch` as a dict of all its fields; raises CorpusError naming the line."""
    payload = batch.payloads[position]
    if isinstance(payload, bytes):
        payload = _decode_json_line(payload, record_location(batch, position))
    if not isinstance(payload, dict):
        raise CorpusError(f"{record_location(batch, position)}: expected a JSON object, found {type(payload).__name__}")
    return payload


def parse_record(batch: RecordBatch, position: int, keys: Sequence[str]) -> list[str]:
    """The text of each key for record `position` of `batch`; raises CorpusError naming the line."""
    payload = load_record(batch, position)
    where = record_location(batch, position)
    texts = []
    for key in keys:
        if key not in payload:
            found = ", ".join(sorted(map(str, payload))) or "none"
            raise CorpusError(f"{where}: no key {key!r} (keys: {found}); pass --json-keys with the right name")
        value = payload[key]
        if not isinstance(value, str):
            raise CorpusError(f"{where}: {key!r} is {type(value).__name__}, expected a string")
        texts.append(value)
    return texts


def iter_texts(sources: Sequence[Source], keys: Sequence[str], txt_mode: str = "line") -> Iterator[str]:
    """Every text of every record, in order, parsed in this process (for tokenizer training)."""
    for batch in read_record_batches(sources, keys, txt_mode):
        for position in range(len(batch.payloads)):
            yield from parse_record(batch, position, keys)


def json_lines(path: str | Path, what: str) -> Iterator[tuple[str, object]]:
    """(`FILE:LINE`, decoded object) for every non-blank line of a small JSON-lines file (prompts,
    evaluation sets, preference pairs), with one-line errors: `what` names the file for the user
    (e.g. "--prompts-file")."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON ({exc.msg}); write one object per line") from None


def _decode_json_line(line: bytes, where: str):
    try:
        return json.loads(line)
    except UnicodeDecodeError:
        raise CorpusError(f"{where}: not valid UTF-8; re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); fix or remove the line") from None


_GZIP_MAGIC = b"\x1f\x8b"


def _open_binary(path: str):
    if not path.endswith(".gz"):
        return open(path, "rb")
    with open(path, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            raise CorpusError(f"{path}: not gzip data although its name ends in .gz; rename it without .gz if it is "
                              "plain text, or compress it with gzip")
    return gzip.open(path, "rb")


@contextlib.contextmanager
def _gzip_errors(path: str):
    """A damaged .gz (truncated, bad checksum) as one line naming the file, not zlib's words alone."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorpusError(f"{path}: damaged gzip data ({reason}); re-create or download the file again") from None


def _json_batches(path: str) -> Iterator[RecordBatch]:
    with _open_binary(path) as stream, _gzip_errors(path):
        if _first_significant_byte(stream) == b"[":
            yield from _json_array_batches(path, stream)
            return
        batch = RecordBatch(path, "line")
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            batch.locations.append(line_number)
            batch.payloads.append(line)
            batch.num_bytes += len(line)
            if batch.num_bytes >= _BATCH_BYTES or len(batch.payloads) >= _BATCH_ROWS:
                yield batch
                batch = RecordBatch(path, "line")
        if batch.payloads:
            yield batch


def _first_significant_byte(stream) -> bytes:
    head = stream.peek(64) if hasattr(stream, "peek") else b""
    stripped = head.lstrip()
    return stripped[:1]


def _json_array_batches(path: str, stream) -> Iterator[RecordBatch]:
    # A whole-file JSON array must be loaded at once; fine for the small files people write by hand.
    try:
        items = json.load(stream)
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not valid UTF-8; re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    yield from _batched(path, "item", enumerate(items, start=1))


def _txt_documents(path: str, mode: str) -> Iterator[tuple[int, dict]]:
    if mode not in TXT_MODES:
        raise CorpusError(f"unknown text mode {mode!r}; use one of {', '.join(TXT_MODES)}")
    with _open_binary(path) as stream, _gzip_errors(path):
        try:
            text = stream.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
    if mode == "file":
        yield 1, {"text": text}
        return
    start_line, paragraph = 0, []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if mode == "line":
            if line.strip():
                yield line_number, {"text": line}
        elif line.strip():
            start_line = start_line or line_number
            paragraph.append(line)
        elif paragraph:
            yield start_line, {"text": "\n".join(paragraph)}
            start_line, paragraph = 0, []
    if paragraph:
        yield start_line, {"text": "\n".join(paragraph)}


def _batched(source: str, unit: str, rows) -> Iterator[RecordBatch]:
    batch = RecordBatch(source, unit)
    for location, payload in rows:
        batch.locations.append(location)
        batch.payloads.append(payload)
        if len(batch.payloads) >= _BATCH_ROWS:
            yield batch
            batch = RecordBatch(source, unit)
    if batch.payloads:
        yield batch


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise CorpusError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _check_columns(path: str, columns: Sequence[str], keys: Sequence[str] | None) -> None:
    missing = [key for key in keys or () if key not in columns]
    if missing:
        raise CorpusError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(columns)}); pass --json-keys with the right name"
        )


def _parquet_batches(path: str, keys: Sequence[str] | None) -> Iterator[RecordBatch]:
    import pyarrow.parquet as pq

    _check_columns(path, _parquet_columns(path), keys)
    next_row = 1
    columns = None if keys is None else list(keys)
    for table in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        rows = table.to_pylist()
        yield RecordBatch(path, "row", list(range(next_row, next_row + len(rows))), rows)
        next_row += len(rows)


def _load_hf_dataset(path: str):
    import datasets

    try:
        return datasets.load_from_disk(path)
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, arrow errors, ...
        raise CorpusError(f"{path}: not a readable saved Hugging Face dataset ({str(exc).splitlines()[0]})") from None


def _hf_batches(path: str, keys: Sequence[str] | None) -> Iterator[RecordBatch]:
    dataset = _load_hf_dataset(path)
    _check_columns(path, dataset.column_names, keys)
    keys = list(dataset.column_names if keys is None else keys)
    if not keys:  # a dataset without columns has no records to read
        return
    next_row = 1
    for columns in dataset.select_columns(keys).iter(batch_size=_BATCH_ROWS):
        count = len(columns[keys[0]])
        rows = [{key: columns[key][i] for key in keys} for i in range(count)]
        yield RecordBatch(path, "row", list(range(next_row, next_row + count)), rows)
        next_row += count

