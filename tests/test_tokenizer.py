"""Tokenizers: SentencePiece, Hugging Face tokenizer.json and the null tokenizer; tokenizer training."""

from __future__ import annotations

import argparse
import json

import pytest

from megatron.core.tokenizers.tokenizer import (
    HuggingFaceTokenizer, NullTokenizer, SentencePieceTokenizer, SentencePieceTrainingConfig, TokenizerConfig,
    build_tokenizer, train_sentencepiece, vocab_size_with_padding,
)
from megatron.training.flags import TokenizerArgs

UNUSUAL_TEXT = "naïve café → 世界 🚀\n\tindented\r\n  two  spaces\n\n"


def test_sentencepiece_round_trips_every_corpus_document(builtin_corpus_small):
    tokenizer = build_tokenizer(TokenizerConfig(
        tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(builtin_corpus_small.tokenizer_model)))
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (1024, 1, 2, 3)
    documents = builtin_corpus_small.documents()
    assert len(documents) == builtin_corpus_small.manifest["num_documents"]
    for text in documents:
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    # Characters never seen in training come back exactly through byte fallback.
    assert tokenizer.detokenize(tokenizer.tokenize(UNUSUAL_TEXT)) == UNUSUAL_TEXT
    assert tokenizer.eod not in tokenizer.tokenize("a</s>b")  # special pieces are not produced from text


def test_huggingface_tokenizer_round_trip_and_special_ids(tmp_path, write_hf_tokenizer):
    path, raw = write_hf_tokenizer(tmp_path)
    tokenizer = build_tokenizer(TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(path)))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert tokenizer.eod == raw.token_to_id("<|endoftext|>")
    assert tokenizer.pad == raw.token_to_id("<pad>")
    assert tokenizer.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    ids = tokenizer.tokenize(UNUSUAL_TEXT)
    assert tokenizer.eod not in ids
    assert tokenizer.detokenize(ids) == UNUSUAL_TEXT
    # A model folder works as well as the file inside it.
    assert HuggingFaceTokenizer(tmp_path).tokenize("fox") == tokenizer.tokenize("fox")


def test_huggingface_tokenizer_config_names_the_eos(tmp_path, write_hf_tokenizer):
    path, raw = write_hf_tokenizer(tmp_path, special_tokens=("<|endoftext|>", "<|im_end|>"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tokenizer = HuggingFaceTokenizer(path)
    assert tokenizer.eod == raw.token_to_id("<|im_end|>")
    assert tokenizer.pad == tokenizer.eod  # no pad token: falls back to EOD


def test_huggingface_tokenizer_without_eod_is_refused(tmp_path, write_hf_tokenizer):
    path, _ = write_hf_tokenizer(tmp_path, special_tokens=("<unk>",))
    with pytest.raises(ValueError, match="no end-of-document token"):
        HuggingFaceTokenizer(path)


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_unreadable_or_missing_model_is_a_clear_value_error(tmp_path, tokenizer_type):
    garbage = tmp_path / "broken.model"
    garbage.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match=f"cannot load .*{garbage.name}.*--tokenizer-model"):
        build_tokenizer(TokenizerConfig(tokenizer_type=tokenizer_type, tokenizer_model=str(garbage)))
    with pytest.raises(ValueError, match="tokenizer model not found"):
        build_tokenizer(TokenizerConfig(tokenizer_type=tokenizer_type, tokenizer_model=str(tmp_path / "none")))


@pytest.mark.parametrize("kwargs, message", [
    ({"tokenizer_type": "BertWordPieceCase", "tokenizer_model": "x"}, "unknown --tokenizer-type"),
    ({"tokenizer_type": "GPT2BPETokenizer", "tokenizer_model": None}, "needs --vocab-file VOCAB.json"),
    ({"tokenizer_type": "SentencePieceTokenizer"}, "needs --tokenizer-model"),
    ({"tokenizer_type": "NullTokenizer"}, "positive --vocab-size"),
])
def test_tokenizer_config_validates_itself(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**kwargs)


def test_null_tokenizer():
    tokenizer = build_tokenizer(TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=100))
    assert isinstance(tokenizer, NullTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (101, 100, 100)
    assert tokenizer.tokenize(" 5 7\n99 ") == [5, 7, 99]
    assert tokenizer.detokenize([5, 7, 99]) == "5 7 99"
    with pytest.raises(ValueError, match="raise --vocab-size"):
        tokenizer.tokenize("100")


def test_vocab_size_with_padding():
    assert vocab_size_with_padding(1000, make_vocab_size_divisible_by=128, tensor_model_parallel_size=2) == 1024
    assert vocab_size_with_padding(1025, make_vocab_size_divisible_by=128) == 1152
    assert vocab_size_with_padding(1024, make_vocab_size_divisible_by=128) == 1024


def test_tokenizer_flags_build_the_config():
    parser = argparse.ArgumentParser()
    TokenizerArgs.add_to(parser)
    args = TokenizerArgs.from_namespace(parser.parse_args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "9"]))
    assert args.tokenizer_config() == TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=9)
    with pytest.raises(ValueError, match="no tokenizer given"):
        TokenizerArgs().tokenizer_config()


def test_sentencepiece_training_is_deterministic_and_exact(tmp_path, builtin_corpus_small):
    texts = builtin_corpus_small.documents()[:40]
    config = SentencePieceTrainingConfig(vocab_size=500, num_threads=1)
    first = train_sentencepiece(texts, tmp_path / "a" / "tok", config)
    second = train_sentencepiece(texts, tmp_path / "b" / "tok", config)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["tok.model", "tok.vocab"]  # no temporary files left
    tokenizer = SentencePieceTokenizer(first)
    assert tokenizer.vocab_size == 500
    assert all(tokenizer.detokenize(tokenizer.tokenize(text)) == text for text in texts)


def test_train_tokenizer_cli(tmp_path, run_tool, builtin_corpus_small):
    completed = run_tool("train_tokenizer.py", "--input", builtin_corpus_small.corpus_jsonl,
                         "--model-prefix", tmp_path / "tok", "--vocab-size", "600", "--threads", "1")
    assert completed.returncode == 0, completed.stderr
    assert "600 pieces" in completed.stdout
    tokenizer = SentencePieceTokenizer(tmp_path / "tok.model")
    assert tokenizer.vocab_size == 600 and tokenizer.eod == 2
    too_large = run_tool("train_tokenizer.py", "--input", builtin_corpus_small.corpus_jsonl,
                         "--model-prefix", tmp_path / "big", "--vocab-size", "900000")
    assert too_large.returncode == 2
    assert too_large.stderr.count("\n") == 1 and "--vocab-size 900000 is too large" in too_large.stderr
    assert not list(tmp_path.glob("big*"))
