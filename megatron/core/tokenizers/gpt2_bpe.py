"""GPT-2's byte-level BPE (Radford et al. 2019), read from its two files: `--vocab-file`
(vocab.json, token -> id) and `--merge-file` (merges.txt, one merge per line, highest priority
first). Megatron-LM's `GPT2BPETokenizer`; written here so that no extra package is needed.

Encoding a text:
1. the pre-tokenizer regex splits it into words (contractions, letters, digits, other symbols,
   each optionally after one space; runs of whitespace);
2. each word's UTF-8 bytes become printable characters through `bytes_to_unicode` (GPT-2's
   reversible byte -> character map, so that a vocabulary of strings covers every byte);
3. BPE merges the word's adjacent pair with the lowest merge rank, again and again, until no pair
   of the word is a merge; the resulting pieces are looked up in the vocabulary.

Decoding joins the pieces and maps the characters back to bytes. `<|endoftext|>` is the EOD token
(id 50256 in GPT-2's files); as in Megatron-LM, the text "<|endoftext|>" is not turned into it when
encoding (documents are ended by id, `--append-eod`).

The regex uses Unicode letter and number classes (``\\p{L}``, ``\\p{N}``), which Python's `re` does not
know; they are built once from `unicodedata` (the same classes as the `regex` package's, for the
Unicode version of this Python).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from megatron.core.tokenizers.tokenizer import MegatronTokenizer

EOD_TOKEN = "<|endoftext|>"
# GPT-2's pattern with \p{L} and \p{N} spelled out (see `_char_class`).
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+"""
_CACHE_LIMIT = 100_000  # words whose BPE result is kept (long preprocessing runs repeat most words)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters: printable Latin-1 bytes map to
    themselves, the others (control characters, space, ...) to characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


@functools.lru_cache(maxsize=None)
def pretokenizer() -> re.Pattern:
    """GPT-2's pre-tokenizer regex, compiled once per process."""
    letters, numbers = _char_classes()
    return re.compile(_PATTERN.replace("{L}", letters).replace("{N}", numbers))


def _char_classes() -> tuple[str, str]:
    """The bodies of ``[\\p{L}]`` and ``[\\p{N}]`` as `re` character-class ranges."""
    ranges: dict[str, list[list[int]]] = {"L": [], "N": []}
    for code in range(sys.maxunicode + 1):
        kind = unicodedata.category(chr(code))[0]
        if kind in ranges:
            spans = ranges[kind]
            if spans and spans[-1][1] == code - 1:
                spans[-1][1] = code
            else:
                spans.append([code, code])
    return tuple("".join(_range_text(lo, hi) for lo, hi in ranges[kind]) for kind in ("L", "N"))


def _range_text(lo: int, hi: int) -> str:
    return f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}"


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


class GPT2BPETokenizer(MegatronTokenizer):
    """GPT-2's tokenizer from vocab.json and merges.txt; EOD is `<|endoftext|>`."""

    def __init__(self, vocab_file: str | Path, merge_file: str | Path) -> None:
        self.vocab_file, self.merge_file = str(vocab_file), str(merge_file)
        self.encoder = _read_vocab(self.vocab_file)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = _read_merges(self.merge_file)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in self.encoder]
        if missing:
            raise ValueError(f"{self.vocab_file}: no token for the byte symbol {missing[0]!r} ({len(missing)} of "
                             "256 missing); a GPT-2 vocab.json holds all 256 byte symbols")
        if EOD_TOKEN not in self.encoder:
            raise ValueError(f"{self.vocab_file} has no {EOD_TOKEN} token, GPT-2's end of document; add it to the "
                             "vocabulary")
        self._eod = self.encoder[EOD_TOKEN]
        self._cache: dict[str, tuple[str, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eod(self) -> int:
        return self._eod

    def bpe(self, word: str) -> tuple[str, ...]:
        """The pieces of one pre-tokenized word (already mapped to byte characters)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        pieces = tuple(word)
        pairs = _pairs(pieces)
        while pairs:
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            pieces = _merge(pieces, best)
            pairs = _pairs(pieces)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = pieces
        return pieces

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in pretokenizer().findall(text):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(mapped))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        try:
            text = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as exc:
            raise ValueError(f"token id {exc.args[0]} is outside the GPT-2 vocabulary of {self.vocab_size}") from None
        # Tokens that are not byte sequences (none in GPT-2's files) are kept as UTF-8.
        data = bytearray()
        for char in text:
            byte = self.byte_decoder.get(char)
            data.extend(char.encode("utf-8") if byte is None else (byte,))
        return data.decode("utf-8", errors="replace")


def _merge(pieces: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`pieces` with every occurrence of `pair` (left to right, not overlapping) joined."""
    first, second = pair
    merged, i = [], 0
    while i < len(pieces):
        if i < len(pieces) - 1 and pieces[i] == first and pieces[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(pieces[i])
            i += 1
    return tuple(merged)


def _read_vocab(path: str) -> dict[str, int]:
    if not Path(path).is_file():
        raise ValueError(f"GPT-2 vocab file not found: {path}; pass --vocab-file PATH to gpt2-vocab.json")
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read GPT-2 vocab file {path}: {str(exc).splitlines()[0]}; it must be "
                         "a JSON object of token -> id") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"GPT-2 vocab file {path} is not a JSON object of token -> integer id")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"GPT-2 vocab file {path}: the ids must be 0 .. {len(vocab) - 1}, each once")
    return vocab


def _read_merges(path: str) -> dict[tuple[str, str], int]:
    if not Path(path).is_file():
        raise ValueError(f"GPT-2 merge file not found: {path}; pass --merge-file PATH to gpt2-merges.txt")
    ranks: dict[tuple[str, str], int] = {}
    rank = 0
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip() or (line_number == 1 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_number}: expected two symbols separated by a space, got {line!r}")
            ranks[(parts[0], parts[1])] = rank  # a repeated merge takes its last rank, as GPT-2's encoder.py
            rank += 1
    return ranks
