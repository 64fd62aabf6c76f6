"""Tokenizers behind Megatron's `--tokenizer-type` / `--tokenizer-model` flags.

Four kinds, all read from local files only (nothing is downloaded):
  SentencePieceTokenizer  a `tokenizer.model` (e.g. from tools/train_tokenizer.py)
  HuggingFaceTokenizer    a `tokenizer.json` of the `tokenizers` package (or a folder holding one)
  GPT2BPETokenizer        GPT-2's byte-level BPE from `--vocab-file vocab.json --merge-file merges.txt`
                          (Megatron-LM's; `gpt2_bpe.py`, no dependency)
  NullTokenizer           text is space-separated integer ids (`--vocab-size N`), for tests

Every tokenizer exposes `vocab_size`, `eod`, `bos`, `pad`, `tokenize(text)` and `detokenize(ids)`.
This module imports neither torch nor megatron.core, so the preprocessing workers start quickly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer")

# End-of-document names tried, in order, when a tokenizer.json does not say which token it is.
_HF_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
_HF_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_HF_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


@dataclass(kw_only=True)
class TokenizerConfig:
    """Which tokenizer to load; built from `--tokenizer-type`, `--tokenizer-model`, `--vocab-size`,
    `--vocab-file` and `--merge-file`."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_size: int | None = None  # NullTokenizer only: ids are 0..vocab_size-1, EOD is vocab_size
    vocab_file: str | None = None  # GPT2BPETokenizer: vocab.json (token -> id)
    merge_file: str | None = None  # GPT2BPETokenizer: merges.txt (one merge per line, by rank)

    def __post_init__(self) -> None:
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"unknown --tokenizer-type {self.tokenizer_type!r}; use one of {', '.join(TOKENIZER_TYPES)}"
            )
        if (self.vocab_file or self.merge_file) and self.tokenizer_type != "GPT2BPETokenizer":
            raise ValueError(f"--vocab-file and --merge-file are read by --tokenizer-type GPT2BPETokenizer only, "
                             f"not {self.tokenizer_type}; drop them or change --tokenizer-type")
        if self.tokenizer_type == "NullTokenizer":
            if self.vocab_size is None or self.vocab_size < 1:
                raise ValueError("NullTokenizer needs a positive --vocab-size")
        elif self.tokenizer_type == "GPT2BPETokenizer":
            self._gpt2_files()
        elif not self.tokenizer_model:
            raise ValueError(f"{self.tokenizer_type} needs --tokenizer-model PATH")

    def _gpt2_files(self) -> tuple[str, str]:
        """(vocab.json, merges.txt): the flags, or the two files in a --tokenizer-model folder."""
        if self.vocab_file and self.merge_file:
            return self.vocab_file, self.merge_file
        if self.tokenizer_model and not (self.vocab_file or self.merge_file):
            folder = Path(self.tokenizer_model)
            return str(folder / "vocab.json"), str(folder / "merges.txt")
        raise ValueError("GPT2BPETokenizer needs --vocab-file VOCAB.json and --merge-file MERGES.txt (GPT-2's "
                         "gpt2-vocab.json and gpt2-merges.txt), or --tokenizer-model FOLDER holding vocab.json "
                         "and merges.txt")

    @property
    def files(self) -> list[str]:
        """The files that define the tokenizer (what its fingerprint hashes)."""
        if self.tokenizer_type == "GPT2BPETokenizer":
            return list(self._gpt2_files())
        return [self.tokenizer_model] if self.tokenizer_model else []


class MegatronTokenizer(ABC):
    """The interface the data pipeline and the models rely on."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> int | None:
        return None

    @property
    def pad(self) -> int:
        # Padding positions are always loss-masked, so reusing EOD is safe where there is no PAD.
        return self.eod

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer(MegatronTokenizer):
    """A SentencePiece model; EOD is its `</s>` (eos) piece."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece

        self.model_path = str(model_path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(
                f"cannot load SentencePiece model {self.model_path}: {_first_line(exc)}; pass "
                "--tokenizer-model PATH to a .model file (tools/train_tokenizer.py writes one)"
            ) from None
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"SentencePiece model {self.model_path} has no </s> piece to mark the end of a "
                "document; retrain it with eos_id set (tools/train_tokenizer.py does)"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def pad(self) -> int:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(MegatronTokenizer):
    """A `tokenizers` tokenizer.json; special ids come from a tokenizer_config.json beside it if any."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.model_path = str(path)
        try:
            self._tok = Tokenizer.from_file(self.model_path)
        except Exception as exc:  # the Rust side raises a bare Exception for every failure
            raise ValueError(
                f"cannot load Hugging Face tokenizer {self.model_path}: {_first_line(exc)}; pass "
                "--tokenizer-model PATH to a tokenizer.json file"
            ) from None
        named = _special_tokens_from_config(path.parent / "tokenizer_config.json")
        self._eod = self._find_id(named.get("eos_token"), _HF_EOD_CANDIDATES)
        if self._eod is None:
            raise ValueError(
                f"Hugging Face tokenizer {self.model_path} has no end-of-document token; add one of "
                f"{', '.join(_HF_EOD_CANDIDATES)} as a special token or set eos_token in tokenizer_config.json"
            )
        self._bos = self._find_id(named.get("bos_token"), _HF_BOS_CANDIDATES)
        self._pad = self._find_id(named.get("pad_token"), _HF_PAD_CANDIDATES)

    def _find_id(self, configured: str | None, candidates: Iterable[str]) -> int | None:
        for token in ([configured] if configured else []) + list(candidates):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad if self._pad is not None else self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(MegatronTokenizer):
    """Text is whitespace-separated integer ids; the id `vocab_size` (one past the last) is EOD."""

    def __init__(self, vocab_size: int) -> None:
        self._num_ids = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._num_ids + 1

    @property
    def eod(self) -> int:
        return self._num_ids

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise ValueError("NullTokenizer input must be whitespace-separated integers") from None
        if any(not 0 <= i < self._num_ids for i in ids):
            raise ValueError(f"NullTokenizer ids must lie in [0, {self._num_ids}); raise --vocab-size")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(config: TokenizerConfig) -> MegatronTokenizer:
    if config.tokenizer_type == "NullTokenizer":
        return NullTokenizer(config.vocab_size)
    if config.tokenizer_type == "GPT2BPETokenizer":
        from megatron.core.tokenizers.gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(*config.files)
    path = Path(config.tokenizer_model)
    if not path.exists():
        raise ValueError(
            f"tokenizer model not found: {path}; check --tokenizer-model "
            "(tools/builtin_corpus.py or tools/train_tokenizer.py can make one)"
        )
    if config.tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)


def vocab_size_with_padding(vocab_size: int, *, make_vocab_size_divisible_by: int = 128,
                            tensor_model_parallel_size: int = 1) -> int:
    """Round the vocabulary up so every tensor-parallel shard of the embedding has equal, aligned rows."""
    if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError("--make-vocab-size-divisible-by and the tensor-parallel size must be >= 1")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def _special_tokens_from_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {_first_line(exc)}; fix or delete it") from None
    names = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # transformers writes AddedToken objects as dicts
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------- SentencePiece training

@dataclass(kw_only=True)
class SentencePieceTrainingConfig:
    """Options of tools/train_tokenizer.py; the defaults keep text byte-exact through a round trip."""

    vocab_size: int = 8000
    model_type: str = "bpe"
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    max_sentences: int = 2_000_000  # SentencePiece samples this many lines; more costs memory, not quality
    num_threads: int = 2
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ValueError("--vocab-size must be at least 260 (256 byte pieces plus the 4 special ones)")
        if self.model_type not in ("bpe", "unigram", "char", "word"):
            raise ValueError("--model-type must be one of bpe, unigram, char, word")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError("--character-coverage must be in (0, 1]")
        if self.max_sentences < 1 or self.num_threads < 1:
            raise ValueError("--max-sentences and --threads must be >= 1")


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike,
                        config: SentencePieceTrainingConfig, *, verbose: bool = False) -> Path:
    """Train on `texts` and write MODEL_PREFIX.model and .vocab, each renamed into place when complete.

    Special ids are fixed (unk 0, bos 1, eos/EOD 2, pad 3) so models are interchangeable in configs.
    Normalisation is off and whitespace is kept, so code and indentation survive tokenize/detokenize.
    """
    import sentencepiece

    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.set_random_generator_seed(config.seed)
    model_buffer = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_nonblank_lines(texts), model_writer=model_buffer,
            vocab_size=config.vocab_size, model_type=config.model_type,
            byte_fallback=config.byte_fallback, character_coverage=config.character_coverage,
            input_sentence_size=config.max_sentences, shuffle_input_sentence=True,
            num_threads=config.num_threads, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as exc:
        raise ValueError(_explain_training_error(exc, config)) from None
    model_bytes = model_buffer.getvalue()
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    vocab_lines = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.vocab_size())
    )
    _write_atomically(prefix.with_name(prefix.name + ".vocab"), vocab_lines.encode("utf-8"))
    model_path = prefix.with_name(prefix.name + ".model")
    _write_atomically(model_path, model_bytes)
    return model_path


def _nonblank_lines(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece learns pieces within lines; newlines themselves become byte-fallback tokens.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def _explain_training_error(exc: RuntimeError, config: SentencePieceTrainingConfig) -> str:
    message = _first_line(exc)
    too_high = re.search(r"value <= (\d+)", message)
    if too_high:
        return (f"--vocab-size {config.vocab_size} is too large for this corpus; use at most "
                f"{too_high.group(1)} or give more text")
    return f"SentencePiece training failed: {message}"


def _write_atomically(path: Path, payload: bytes) -> None:
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp_path.write_bytes(payload)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def tokenizer_fingerprint(config: TokenizerConfig) -> dict:
    """What decides the meaning of token ids: the type, the vocabulary size and the model file's
    bytes (a copy of the same file elsewhere matches; a retrained one of the same size does not).
    Checkpoints record it, so that a model is never paired with another tokenizer."""
    tokenizer = build_tokenizer(config)
    digest = None
    if config.tokenizer_type == "GPT2BPETokenizer":  # vocab.json then merges.txt
        digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in config.files)).hexdigest()
    elif config.tokenizer_model:
        path = Path(config.tokenizer_model)
        if path.is_dir():  # a Hugging Face folder: its tokenizer files
            names = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
            files = [path / n for n in names if (path / n).is_file()]
            digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else None
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"type": config.tokenizer_type, "vocab_size": tokenizer.vocab_size, "sha256": digest}
