"""GPT-2's byte-level BPE (`--vocab-file` / `--merge-file`): hand-computed merges on a tiny
vocabulary written here, agreement with transformers' GPT2Tokenizer, round trips, the flags, the
fingerprint and preprocessing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megatron.core.tokenizers.gpt2_bpe import GPT2BPETokenizer, bytes_to_unicode, pretokenizer
from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer, tokenizer_fingerprint
from megatron.training.flags import TokenizerArgs

# Ranks are line order: "Ġ t" merges before "h e", and so on.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "o"), ("lo", "w")]
UNUSUAL_TEXT = "naïve café → 世界 🚀\n\tindented\r\n  two  spaces\n\n it's  x² ½"


def write_tiny_bpe(folder: Path, merges=MERGES, eod: bool = True) -> tuple[Path, Path]:
    """vocab.json: the 256 byte symbols (id = byte value), the merges' results, then <|endoftext|>."""
    symbols = bytes_to_unicode()
    vocab = {symbols[byte]: byte for byte in range(256)}
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    if eod:
        vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


@pytest.fixture()
def tiny(tmp_path) -> GPT2BPETokenizer:
    return GPT2BPETokenizer(*write_tiny_bpe(tmp_path / "tiny"))


def test_byte_map_and_pretokenizer_are_gpt2s():
    symbols = bytes_to_unicode()
    assert len(set(symbols.values())) == 256
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] == "Ġ" and symbols[ord("\n")] == "Ċ"
    # contractions, letters / digits / other symbols each after one optional space, whitespace runs
    assert pretokenizer().findall("It's 42 cats!!  \n\tdone") == ["It", "'s", " 42", " cats", "!!", "  \n", "\t", "done"]
    assert pretokenizer().findall("naïve 世界 x²") == ["naïve", " 世界", " x", "²"]


def test_merges_by_rank_by_hand(tiny):
    vocab = tiny.encoder
    # " the": Ġ t h e -> (Ġ t) rank 0 -> Ġt h e -> (h e) rank 1 -> Ġt he -> (Ġt he) rank 2 -> Ġthe
    assert tiny.tokenize(" the") == [vocab["Ġthe"]]
    # "the": t h e -> (h e) -> t he; (t he) is no merge
    assert tiny.tokenize("the") == [ord("t"), vocab["he"]]
    # " lower": Ġ l o w e r -> (l o) rank 3 -> Ġ lo w e r -> (lo w) rank 4 -> Ġ low e r
    assert tiny.tokenize("the lower") == [ord("t"), vocab["he"], ord(" "), vocab["low"], ord("e"), ord("r")]
    assert tiny.eod == len(vocab) - 1 and tiny.vocab_size == 256 + 5 + 1
    # The text "<|endoftext|>" is not the EOD token (Megatron-LM's GPT2BPETokenizer); EOD comes by id.
    assert tiny.eod not in tiny.tokenize("a<|endoftext|>b")
    assert tiny.detokenize([tiny.eod]) == "<|endoftext|>"


def test_round_trip_of_any_text(tiny):
    for text in (UNUSUAL_TEXT, "", "   ", "\x00\x01 binary \xff"):
        assert tiny.detokenize(tiny.tokenize(text)) == text


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_same_ids_as_transformers_gpt2_tokenizer(tmp_path, write_hf_tokenizer):
    from transformers import GPT2Tokenizer

    texts = [UNUSUAL_TEXT, "The quick brown fox jumps over the lazy dog.", "def tokenize(text): return text.split()",
             "I'll say we've they're you'd 3.14159 == pi?!", "  leading and trailing  ", "x" * 50]
    # the tiny hand-written files, and a 400-token vocabulary trained by `tokenizers` (a core dependency)
    (tmp_path / "trained").mkdir()
    _, trained = write_hf_tokenizer(tmp_path / "trained")
    trained.model.save(str(tmp_path / "trained"))
    for vocab_file, merge_file in (write_tiny_bpe(tmp_path / "tiny"),
                                   (tmp_path / "trained" / "vocab.json", tmp_path / "trained" / "merges.txt")):
        ours = GPT2BPETokenizer(vocab_file, merge_file)
        theirs = GPT2Tokenizer(str(vocab_file), str(merge_file))
        for text in texts:
            assert ours.tokenize(text) == theirs.encode(text), text
            assert ours.detokenize(ours.tokenize(text)) == theirs.decode(theirs.encode(text))


def test_flags_select_it_and_fingerprint_the_files(tmp_path):
    vocab_file, merge_file = write_tiny_bpe(tmp_path / "bpe")
    # Megatron-LM's GPT scripts pass the two files and no --tokenizer-type
    config = TokenizerArgs(vocab_file=str(vocab_file), merge_file=str(merge_file)).tokenizer_config()
    assert config.tokenizer_type == "GPT2BPETokenizer"
    assert isinstance(build_tokenizer(config), GPT2BPETokenizer)
    folder = TokenizerConfig(tokenizer_type="GPT2BPETokenizer", tokenizer_model=str(tmp_path / "bpe"))
    assert build_tokenizer(folder).tokenize(" the") == build_tokenizer(config).tokenize(" the")
    first = tokenizer_fingerprint(config)
    assert first["type"] == "GPT2BPETokenizer" and first["vocab_size"] == 262 and first["sha256"]
    assert tokenizer_fingerprint(folder) == first
    write_tiny_bpe(tmp_path / "bpe", merges=MERGES[:-1] + [("o", "w")])  # another merge list, same size
    assert tokenizer_fingerprint(config)["sha256"] != first["sha256"]


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "vocab.json").unlink(), "GPT-2 vocab file not found"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\nh e x\n"), "merges.txt:2: expected two symbols"),
    (lambda d: (d / "vocab.json").write_text("[1, 2]"), "not a JSON object of token -> integer id"),
    (lambda d: write_tiny_bpe(d, eod=False), "has no <|endoftext|> token"),
    (lambda d: (d / "vocab.json").write_text(json.dumps({"a": 0, "<|endoftext|>": 1})), "no token for the byte symbol"),
])
def test_bad_files_are_one_clear_error(tmp_path, change, message):
    folder = tmp_path / "bpe"
    write_tiny_bpe(folder)
    change(folder)
    with pytest.raises(ValueError, match=message.replace("|", r"\|")) as error:
        build_tokenizer(TokenizerConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=str(folder / "vocab.json"),
                                        merge_file=str(folder / "merges.txt")))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("args, message", [
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="v.json"), "needs --vocab-file VOCAB.json and --merge-file"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="t.model", vocab_file="v.json"),
     "read by --tokenizer-type GPT2BPETokenizer only"),
    (dict(vocab_file="v.json"), "no tokenizer given"),
])
def test_flag_mistakes_name_the_fix(args, message):
    with pytest.raises(ValueError, match=message):
        TokenizerArgs(**args).tokenizer_config()


def test_preprocess_data_with_gpt2_bpe(tmp_path, run_tool):
    vocab_file, merge_file = write_tiny_bpe(tmp_path / "bpe")
    documents = ["the lower the better", UNUSUAL_TEXT]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    result = run_tool("preprocess_data.py", "--input", corpus, "--output-prefix", tmp_path / "out",
                      "--vocab-file", vocab_file, "--merge-file", merge_file, "--append-eod", "--workers", "2")
    assert result.returncode == 0, result.stderr
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    tokenizer = GPT2BPETokenizer(vocab_file, merge_file)
    assert [list(np.asarray(dataset[i])) for i in range(len(dataset))] == [
        tokenizer.tokenize(d) + [tokenizer.eod] for d in documents]
