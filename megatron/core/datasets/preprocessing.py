"""Tokenize a corpus into `PREFIX_{key}_document.bin/.idx`, the engine of tools/preprocess_data.py.

Workers parse and tokenize batches of raw records; the main process writes their results in input
order, so the output is byte-identical for any number of workers. At most a few batches per worker
are in flight, which keeps memory flat on corpora of any size.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron.core.datasets.corpus_readers import (
    TXT_MODES, CorpusError, RecordBatch, check_keys_for_sources, count_records, parse_record,
    read_record_batches, resolve_sources,
)
from megatron.core.datasets.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer

_BATCHES_IN_FLIGHT_PER_WORKER = 4


@dataclass(kw_only=True)
class PreprocessConfig:
    input: str
    output_prefix: str
    tokenizer: TokenizerConfig
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    keep_empty: bool = False
    workers: int = 1
    txt_mode: str = "line"
    show_progress: bool | None = None  # None: a progress bar only when stderr is a terminal

    def __post_init__(self) -> None:
        self.json_keys = tuple(self.json_keys)
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError("--json-keys needs one or more distinct field names")
        if any(not key or "/" in key or os.sep in key for key in self.json_keys):
            raise ValueError("--json-keys names become file names; use names without '/'")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.txt_mode not in TXT_MODES:
            raise ValueError(f"--txt-mode must be one of {', '.join(TXT_MODES)}")
        if not self.output_prefix or Path(self.output_prefix).is_dir():
            raise ValueError("--output-prefix must be a file name prefix, e.g. data/my-corpus, not a folder")


@dataclass
class PreprocessResult:
    output_prefixes: dict[str, str]
    num_documents: int = 0
    num_skipped: int = 0
    num_tokens: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    dtype: str = ""

    @property
    def documents_per_second(self) -> float:
        return self.num_documents / max(self.seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


@dataclass
class EncodedBatch:
    """Per key: the batch's tokens back to back and the length of each kept document."""

    tokens: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    num_skipped: int = 0
    num_bytes: int = 0


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


class _Encoder:
    def __init__(self, config: PreprocessConfig) -> None:
        self.keys = config.json_keys
        self.append_eod = config.append_eod
        self.keep_empty = config.keep_empty
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.dtype = token_dtype_for_vocab(self.tokenizer.vocab_size)

    def encode_batch(self, batch: RecordBatch) -> EncodedBatch:
        per_key_ids: list[list[list[int]]] = [[] for _ in self.keys]
        encoded = EncodedBatch(num_bytes=batch.num_bytes)
        for position in range(len(batch.payloads)):
            texts = parse_record(batch, position, self.keys)
            if not self.keep_empty and not any(texts):
                encoded.num_skipped += 1
                continue
            for key_ids, text in zip(per_key_ids, texts):
                ids = self.tokenizer.tokenize(text) if text else []
                if self.append_eod:
                    ids.append(self.tokenizer.eod)
                key_ids.append(ids)
        for documents in per_key_ids:
            lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
            encoded.lengths.append(lengths)
            encoded.tokens.append(np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int64,
                                              count=int(lengths.sum())))
        return encoded


_worker_encoder = None  # in a worker process: what `make_encoder` built there


def _start_worker(make_encoder: Callable, arguments: tuple) -> None:
    global _worker_encoder
    # Each worker is one process; the Rust tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = make_encoder(*arguments)


def _encode_in_worker(batch: RecordBatch):
    assert _worker_encoder is not None
    return _worker_encoder.encode_batch(batch)


def preprocess(config: PreprocessConfig) -> PreprocessResult:
    """Tokenize `config.input` into one indexed dataset per JSON key; raises ValueError on bad input."""
    started = time.perf_counter()
    sources = resolve_sources(config.input)
    check_keys_for_sources(sources, config.json_keys)
    encoder = _Encoder(config)  # loads the tokenizer here first, so a bad model fails before workers start
    prefixes = {key: output_prefix_for_key(config.output_prefix, key) for key in config.json_keys}
    result = PreprocessResult(prefixes, dtype=np.dtype(encoder.dtype).name)
    with contextlib.ExitStack() as cleanup:  # unfinished writers delete their temporary files
        writers = _open_writers(config, prefixes, encoder.dtype, cleanup)
        batches = read_record_batches(sources, config.json_keys, config.txt_mode)
        with _progress_bar(config, sources) as progress:
            for encoded in encode_in_order(batches, encoder, workers=config.workers, make_encoder=_Encoder,
                                           arguments=(config,)):
                _write_encoded(writers, encoded, result)
                progress(len(encoded.lengths[0]) + encoded.num_skipped, result)
        if result.num_documents == 0:
            raise CorpusError(
                f"--input {config.input}: no documents (every record was empty); check the input and --json-keys"
            )
        for writer in writers:
            writer.finalize()
    result.seconds = time.perf_counter() - started
    return result


def _open_writers(config: PreprocessConfig, prefixes: dict[str, str], dtype, cleanup) -> list[IndexedDatasetWriter]:
    try:
        Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)
        return [cleanup.enter_context(IndexedDatasetWriter(prefixes[key], dtype)) for key in config.json_keys]
    except OSError as exc:
        raise ValueError(f"--output-prefix {config.output_prefix}: cannot write there ({exc.strerror}); "
                         "choose a writable folder") from None


def encode_in_order(batches: Iterable[RecordBatch], encoder, *, workers: int, make_encoder: Callable,
                    arguments: tuple) -> Iterator:
    """`encode_batch(batch)` of every batch, in input order: by `encoder` here when `workers` is 1, else
    by `workers` processes that each build `make_encoder(*arguments)` (both picklable) once."""
    if workers == 1:
        yield from map(encoder.encode_batch, batches)
        return
    # "spawn" starts clean interpreters: safe whatever threads or libraries the caller has running.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(make_encoder, arguments)) as pool:
        yield from _ordered_map(pool, _encode_in_worker, batches, workers * _BATCHES_IN_FLIGHT_PER_WORKER)


def _ordered_map(pool, function: Callable, items: Iterable, max_in_flight: int) -> Iterator:
    # Pool.imap reads its whole input ahead of the workers; this keeps at most max_in_flight queued.
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _write_encoded(writers: list[IndexedDatasetWriter], encoded: EncodedBatch, result: PreprocessResult) -> None:
    for writer, tokens, lengths in zip(writers, encoded.tokens, encoded.lengths):
        writer.add_documents(tokens, lengths)
    result.num_documents += len(encoded.lengths[0])
    result.num_skipped += encoded.num_skipped
    result.num_tokens += int(sum(len(tokens) for tokens in encoded.tokens))
    result.num_bytes += encoded.num_bytes


class _progress_bar:
    """tqdm with documents/s and tokens/s; silent when disabled or when stderr is not a terminal."""

    def __init__(self, config: PreprocessConfig, sources) -> None:
        self._config, self._sources = config, sources
        self._bar = None

    def __enter__(self):
        if self._config.show_progress is not False:
            from tqdm import tqdm

            total = count_records(self._sources)
            disable = None if self._config.show_progress is None else False
            self._bar = tqdm(total=total, unit="doc", desc="preprocessing", disable=disable, smoothing=0.1)
        return self._update

    def _update(self, num_records: int, result: PreprocessResult) -> None:
        if self._bar is None:
            return
        self._bar.update(num_records)
        elapsed = max(self._bar.format_dict["elapsed"], 1e-9)
        self._bar.set_postfix(tokens_per_s=f"{result.num_tokens / elapsed:,.0f}", refresh=False)

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.close()
