"""Instruction data -> the indexed datasets supervised fine-tuning reads; the engine of tools/preprocess_sft.py.

Writes, for `--output-prefix P` (docs/sft_data.md):

  P_tokens_document.bin/.idx           token ids, one document per sample, in input order
  P_loss_mask_document.bin/.idx        uint8, the same lengths: 1 where the token is a target
  P-valid_tokens_document.bin/.idx     the same pair for the validation samples (--valid-fraction > 0)
  P-valid_loss_mask_document.bin/.idx
  P_sft_stats.json                     counts: samples read / written / dropped (by reason) / truncated,
                                       tokens and target tokens, per split

Workers encode batches of records; the main process writes them in input order, so every file is
byte-identical for any number of workers. Everything is written under temporary names and renamed
into place at the end: a run that fails leaves no file behind and old outputs untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron.core.datasets.chat_template import load_chat_template
from megatron.core.datasets.corpus_readers import (
    CorpusError, RecordBatch, Source, count_records, load_record, read_record_batches, record_location,
    resolve_sources,
)
from megatron.core.datasets.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from megatron.core.datasets.preprocessing import encode_in_order
from megatron.core.datasets.sft_dataset import VALID_SUFFIX, sft_dataset_prefixes
from megatron.core.datasets.sft_formats import FORMATS, FieldNames, detect_format, to_conversation
from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer

STATS_SUFFIX = "_sft_stats.json"
OVERLONG_CHOICES = ("drop", "truncate")
DROP_REASONS = ("overlong", "no_target")


@dataclass(kw_only=True)
class SFTPreprocessConfig:
    input: str
    output_prefix: str
    tokenizer: TokenizerConfig
    seq_length: int  # samples may hold seq_length + 1 tokens: seq_length predictions
    sft_format: str = "auto"
    field_names: FieldNames = field(default_factory=FieldNames)
    chat_template: str = "auto"  # "auto", "default" or a .jinja file
    overlong: str = "drop"
    valid_fraction: float = 0.0
    seed: int = 1234
    workers: int = 1

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError("--seq-length must be >= 1")
        if self.sft_format != "auto" and self.sft_format not in FORMATS:
            raise ValueError(f"--sft-format must be auto or one of {', '.join(FORMATS)}")
        if self.overlong not in OVERLONG_CHOICES:
            raise ValueError(f"--overlong must be one of {', '.join(OVERLONG_CHOICES)}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError("--valid-fraction must be in [0, 1)")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if not self.output_prefix or Path(self.output_prefix).is_dir():
            raise ValueError("--output-prefix must be a file name prefix, e.g. data/my-sft, not a folder")


@dataclass
class SFTEncodedBatch:
    """The kept samples of one batch back to back, and what happened to the others."""

    num_records: int
    tokens: np.ndarray  # int64
    loss_mask: np.ndarray  # uint8
    lengths: np.ndarray  # int64, tokens per kept sample
    positions: np.ndarray  # int64, each kept sample's record number within the batch
    num_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    num_pieces_differ: int = 0


@dataclass
class SFTPreprocessResult:
    stats: dict
    files: list[str]
    seconds: float = 0.0


class SFTEncoder:
    """Record -> conversation -> (tokens, loss mask), with the overlong policy; one per worker."""

    def __init__(self, config: SFTPreprocessConfig, formats: dict[str, str | None]) -> None:
        self.config, self.formats = config, formats
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.template = load_chat_template(self.tokenizer, config.chat_template)
        self.max_tokens = config.seq_length + 1

    def encode_record(self, batch: RecordBatch, position: int):
        where = record_location(batch, position)
        record = load_record(batch, position)
        messages = to_conversation(record, self.formats[batch.source], self.config.field_names, where)
        return self.template.encode(messages, where)

    def encode_batch(self, batch: RecordBatch) -> SFTEncodedBatch:
        tokens, masks, positions = [], [], []
        truncated, pieces_differ, dropped = 0, 0, dict.fromkeys(DROP_REASONS, 0)
        for position in range(len(batch.payloads)):
            sample = self.encode_record(batch, position)
            pieces_differ += not sample.matches_whole_text
            ids, mask = sample.tokens, sample.loss_mask
            if len(ids) > self.max_tokens:
                if self.config.overlong == "drop":
                    dropped["overlong"] += 1
                    continue
                ids, mask = ids[:self.max_tokens], mask[:self.max_tokens]
                truncated += 1
            if not mask[1:].any():  # no target left (the first token is never predicted)
                dropped["no_target"] += 1
                continue
            tokens.append(ids)
            masks.append(mask)
            positions.append(position)
        return SFTEncodedBatch(
            num_records=len(batch.payloads),
            tokens=np.concatenate(tokens) if tokens else np.empty(0, np.int64),
            loss_mask=np.concatenate(masks) if masks else np.empty(0, np.uint8),
            lengths=np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)),
            positions=np.asarray(positions, dtype=np.int64),
            num_truncated=truncated, dropped=dropped, num_pieces_differ=pieces_differ,
        )


def preprocess_sft(config: SFTPreprocessConfig) -> SFTPreprocessResult:
    """Encode `config.input` into the SFT files (module docstring); raises ValueError on bad input."""
    started = time.perf_counter()
    sources = resolve_sources(config.input)
    formats = {source.path: _source_format(source, config) for source in sources}
    encoder = SFTEncoder(config, formats)  # a bad tokenizer or template fails here, before any worker starts
    is_valid = _choose_valid_records(config, sources)
    dtype = token_dtype_for_vocab(encoder.tokenizer.vocab_size)
    splits = {"train": config.output_prefix}
    if is_valid is not None:
        splits["valid"] = config.output_prefix + VALID_SUFFIX
    stats = _empty_stats(config, encoder, sources, formats, dtype, splits)
    stats_path = Path(config.output_prefix + STATS_SUFFIX)
    with contextlib.ExitStack() as cleanup:
        writers = _open_writers(config, splits, dtype, cleanup)
        first_record = 0
        batches = read_record_batches(sources, None)
        for encoded in encode_in_order(batches, encoder, workers=config.workers, make_encoder=SFTEncoder,
                                       arguments=(config, formats)):
            valid = is_valid[first_record + encoded.positions] if is_valid is not None else None
            _write_batch(writers, encoded, valid, stats)
            first_record += encoded.num_records
        _check_outputs(config, stats)
        files = _finalize(writers, stats, stats_path, cleanup)
    return SFTPreprocessResult(stats, files, time.perf_counter() - started)


def _source_format(source: Source, config: SFTPreprocessConfig) -> str | None:
    """The record layout of one input file: --sft-format, else what its first record's fields say."""
    if source.kind == "txt":
        raise CorpusError(f"{source.path}: plain text has no prompt and response fields; SFT input is "
                          ".jsonl, .json, .parquet or a saved Hugging Face dataset")
    if config.sft_format != "auto":
        return config.sft_format
    batches = read_record_batches([source], None)
    try:
        batch = next(batches, None)
    finally:
        batches.close()
    if batch is None:
        return None  # no records: nothing to parse
    return detect_format(load_record(batch, 0), config.field_names, record_location(batch, 0))


def _count_records(sources: Sequence[Source]) -> int:
    total = 0
    for source in sources:
        known = count_records([source])
        total += known if known is not None else sum(len(b.payloads) for b in read_record_batches([source], None))
    return total


def _choose_valid_records(config: SFTPreprocessConfig, sources: Sequence[Source]) -> np.ndarray | None:
    """Per input record (in input order): whether it goes to the validation split. A seeded choice of
    round(fraction * records) records (at least one), the same for any number of workers."""
    if config.valid_fraction == 0:
        return None
    num_records = _count_records(sources)
    num_valid = max(1, round(config.valid_fraction * num_records))
    if num_valid >= num_records:
        raise ValueError(f"--valid-fraction {config.valid_fraction} of {num_records} records leaves no training "
                         "sample; lower it or give more data")
    is_valid = np.zeros(num_records, dtype=bool)
    is_valid[np.random.default_rng(config.seed).choice(num_records, size=num_valid, replace=False)] = True
    return is_valid


def _empty_stats(config, encoder, sources, formats, dtype, splits) -> dict:
    return {
        "samples_read": 0, "samples_written": 0, "samples_dropped": 0,
        "dropped": dict.fromkeys(DROP_REASONS, 0), "samples_truncated": 0,
        "tokens": 0, "assistant_tokens": 0,
        "samples_pieces_differ_from_whole_text": 0,
        "splits": {name: {"samples": 0, "tokens": 0, "assistant_tokens": 0} for name in splits},
        "seq_length": config.seq_length, "max_tokens_per_sample": config.seq_length + 1,
        "overlong": config.overlong, "valid_fraction": config.valid_fraction, "seed": config.seed,
        "chat_template": encoder.template.description, "token_dtype": np.dtype(dtype).name,
        "inputs": [{"path": source.path, "format": formats[source.path]} for source in sources],
    }


def _open_writers(config, splits: dict[str, str], dtype, cleanup) -> dict[str, tuple]:
    try:
        Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)
        return {name: tuple(cleanup.enter_context(IndexedDatasetWriter(path, kind))
                            for path, kind in zip(sft_dataset_prefixes(prefix), (dtype, np.uint8)))
                for name, prefix in splits.items()}
    except OSError as exc:
        raise ValueError(f"--output-prefix {config.output_prefix}: cannot write there ({exc.strerror}); "
                         "choose a writable folder") from None


def _write_batch(writers: dict, encoded: SFTEncodedBatch, valid: np.ndarray | None, stats: dict) -> None:
    stats["samples_read"] += encoded.num_records
    stats["samples_truncated"] += encoded.num_truncated
    stats["samples_pieces_differ_from_whole_text"] += encoded.num_pieces_differ
    for reason, count in encoded.dropped.items():
        stats["dropped"][reason] += count
        stats["samples_dropped"] += count
    in_split = {"train": np.ones(len(encoded.lengths), dtype=bool) if valid is None else ~valid}
    if valid is not None:
        in_split["valid"] = valid
    for name, chosen in in_split.items():
        token_chosen = np.repeat(chosen, encoded.lengths)
        lengths, mask = encoded.lengths[chosen], encoded.loss_mask[token_chosen]
        tokens_writer, mask_writer = writers[name]
        tokens_writer.add_documents(encoded.tokens[token_chosen], lengths)
        mask_writer.add_documents(mask, lengths)
        split = stats["splits"][name]
        split["samples"] += len(lengths)
        split["tokens"] += int(lengths.sum())
        split["assistant_tokens"] += int(mask.sum(dtype=np.int64))
    stats["samples_written"] += len(encoded.lengths)
    stats["tokens"] += len(encoded.tokens)
    stats["assistant_tokens"] += int(encoded.loss_mask.sum(dtype=np.int64))


def _check_outputs(config: SFTPreprocessConfig, stats: dict) -> None:
    dropped = ", ".join(f"{count} {reason}" for reason, count in stats["dropped"].items() if count)
    for name, split in stats["splits"].items():
        if split["samples"] == 0:
            raise CorpusError(
                f"--input {config.input}: no {name} sample left of {stats['samples_read']} records"
                + (f" ({dropped} dropped); raise --seq-length or pass --overlong truncate" if dropped else "")
            )


def _finalize(writers: dict, stats: dict, stats_path: Path, cleanup) -> list[str]:
    """Stats to a temporary file, then every dataset renamed into place, then the stats."""
    tmp_stats = stats_path.with_name(f"{stats_path.name}.tmp-{os.getpid()}")
    cleanup.callback(tmp_stats.unlink, missing_ok=True)
    tmp_stats.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    files = []
    for pair in writers.values():
        for writer in pair:
            writer.finalize()
            files += [f"{writer.path_prefix}.bin", f"{writer.path_prefix}.idx"]
    os.replace(tmp_stats, stats_path)
    return files + [str(stats_path)]
