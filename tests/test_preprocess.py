"""tools/preprocess_data.py: round trips, input formats, worker determinism and the error contract."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.preprocessing import PreprocessConfig, preprocess
from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer

DOCUMENTS = ["def f(x):\n    return x + 1\n", "Plain prose, with punctuation!", "naïve 世界 🚀", "last one"]


def _tokenizer_flags(corpus):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(corpus.tokenizer_model)]


def _tokenizer_config(corpus):
    return TokenizerConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(corpus.tokenizer_model))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _documents_of(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _expected(tokenizer, texts, eod=True):
    return [tokenizer.tokenize(t) + ([tokenizer.eod] if eod else []) for t in texts]


def test_round_trip_and_workers_are_byte_identical(tmp_path, run_tool, builtin_corpus_small):
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        completed = run_tool("preprocess_data.py", "--input", builtin_corpus_small.corpus_jsonl, "--output-prefix",
                             prefix, *_tokenizer_flags(builtin_corpus_small), "--append-eod", "--workers", workers)
        assert completed.returncode == 0, completed.stderr
        assert "documents/s" in completed.stdout and "tokens/s" in completed.stdout
        outputs[workers] = {s: (tmp_path / f"w{workers}_text_document{s}").read_bytes() for s in (".bin", ".idx")}
    assert outputs[1] == outputs[2]
    # The built-in corpus was tokenized by the library with 2 workers: the same bytes again.
    assert outputs[1][".bin"] == builtin_corpus_small.data_prefix.with_suffix(".bin").read_bytes()
    tokenizer = build_tokenizer(_tokenizer_config(builtin_corpus_small))
    texts = builtin_corpus_small.documents()
    dataset = IndexedDataset(tmp_path / "w1_text_document")
    assert len(dataset) == len(texts)
    for i, text in enumerate(texts):
        ids = dataset[i].tolist()
        assert ids == tokenizer.tokenize(text) + [tokenizer.eod]
        assert tokenizer.detokenize(ids[:-1]) == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "w1_text_document.bin", "w1_text_document.idx", "w2_text_document.bin", "w2_text_document.idx"]


def test_several_keys_empty_records_and_keep_empty(tmp_path, builtin_corpus_small):
    records = [{"text": "alpha", "title": "A"}, {"text": "", "title": ""}, {"text": "beta", "title": ""}]
    source = _write_jsonl(tmp_path / "in.jsonl", records)
    tokenizer = build_tokenizer(_tokenizer_config(builtin_corpus_small))
    result = preprocess(PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "out"), json_keys=["text", "title"],
                                         tokenizer=_tokenizer_config(builtin_corpus_small)))
    assert (result.num_documents, result.num_skipped) == (2, 1)
    assert _documents_of(tmp_path / "out_text_document") == _expected(tokenizer, ["alpha", "beta"], eod=False)
    assert _documents_of(tmp_path / "out_title_document") == _expected(tokenizer, ["A", ""], eod=False)
    preprocess(PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "keep"), keep_empty=True,
                                append_eod=True, tokenizer=_tokenizer_config(builtin_corpus_small)))
    assert _documents_of(tmp_path / "keep_text_document") == _expected(tokenizer, ["alpha", "", "beta"])


def _write_inputs(folder):
    """The same four documents in every supported form; returns {name: path}."""
    folder.mkdir()
    records = [{"text": t, "id": i} for i, t in enumerate(DOCUMENTS)]
    paths = {"jsonl": _write_jsonl(folder / "a.jsonl", records)}
    paths["json_array"] = folder / "array.json"
    paths["json_array"].write_text(json.dumps(records, indent=2))
    paths["gz"] = folder / "a.jsonl.gz"
    paths["gz"].write_bytes(gzip.compress(paths["jsonl"].read_bytes()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths["parquet"] = folder / "a.parquet"
    pq.write_table(pa.table({"id": list(range(len(DOCUMENTS))), "text": DOCUMENTS}), paths["parquet"], row_group_size=2)
    return paths


def test_every_input_format_gives_the_same_tokens(tmp_path, builtin_corpus_small):
    paths = _write_inputs(tmp_path / "inputs")
    tokenizer = build_tokenizer(_tokenizer_config(builtin_corpus_small))
    expected = _expected(tokenizer, DOCUMENTS)
    for name, path in paths.items():
        preprocess(PreprocessConfig(input=str(path), output_prefix=str(tmp_path / name), append_eod=True,
                                    tokenizer=_tokenizer_config(builtin_corpus_small)))
        assert _documents_of(tmp_path / f"{name}_text_document") == expected, name
    # A folder is read file by file in sorted order: a.jsonl, a.jsonl.gz, a.parquet, array.json.
    preprocess(PreprocessConfig(input=str(tmp_path / "inputs"), output_prefix=str(tmp_path / "folder"),
                                append_eod=True, tokenizer=_tokenizer_config(builtin_corpus_small)))
    assert _documents_of(tmp_path / "folder_text_document") == expected * 4


def test_saved_huggingface_dataset(tmp_path, builtin_corpus_small):
    import datasets

    datasets.Dataset.from_dict({"text": DOCUMENTS, "n": list(range(len(DOCUMENTS)))}).save_to_disk(tmp_path / "hf")
    preprocess(PreprocessConfig(input=str(tmp_path / "hf"), output_prefix=str(tmp_path / "out"), append_eod=True,
                                tokenizer=_tokenizer_config(builtin_corpus_small), workers=2))
    tokenizer = build_tokenizer(_tokenizer_config(builtin_corpus_small))
    assert _documents_of(tmp_path / "out_text_document") == _expected(tokenizer, DOCUMENTS)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCUMENTS})}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"DatasetDict with splits train; pass one split, e.g. --input .*dd/train"):
        preprocess(PreprocessConfig(input=str(tmp_path / "dd"), output_prefix=str(tmp_path / "dd_out"),
                                    tokenizer=_tokenizer_config(builtin_corpus_small)))


@pytest.mark.parametrize("mode, expected", [
    ("line", ["first line", "second line", "third"]),
    ("paragraph", ["first line\nsecond line", "third"]),
    ("file", ["first line\nsecond line\n\nthird\n"]),
])
def test_plain_text_modes(tmp_path, builtin_corpus_small, mode, expected):
    source = tmp_path / "in.txt"
    source.write_text("first line\nsecond line\n\nthird\n")
    preprocess(PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "out"), txt_mode=mode,
                                tokenizer=_tokenizer_config(builtin_corpus_small)))
    tokenizer = build_tokenizer(_tokenizer_config(builtin_corpus_small))
    assert _documents_of(tmp_path / "out_text_document") == _expected(tokenizer, expected, eod=False)


def test_huggingface_tokenizer_with_two_workers(tmp_path, write_hf_tokenizer):
    path, _ = write_hf_tokenizer(tmp_path)
    config = TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(path))
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCUMENTS * 300])
    for workers in (1, 2):
        preprocess(PreprocessConfig(input=str(source), output_prefix=str(tmp_path / f"w{workers}"), append_eod=True,
                                    tokenizer=config, workers=workers))
    tokenizer = build_tokenizer(config)
    assert _documents_of(tmp_path / "w2_text_document") == _expected(tokenizer, DOCUMENTS * 300)
    assert (tmp_path / "w1_text_document.bin").read_bytes() == (tmp_path / "w2_text_document.bin").read_bytes()
    assert tokenizer.detokenize(IndexedDataset(tmp_path / "w2_text_document")[2][:-1]) == DOCUMENTS[2]


def test_vocabulary_of_65500_or_more_is_stored_as_int32(tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": "1 65500 70000"}, {"text": "3"}])
    result = preprocess(PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "out"), append_eod=True,
                                         tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=80000)))
    assert result.dtype == "int32"
    dataset = IndexedDataset(tmp_path / "out_text_document")
    assert dataset.dtype is np.int32
    assert _documents_of(tmp_path / "out_text_document") == [[1, 65500, 70000, 80000], [3, 80000]]


# ------------------------------------------------------------------------------------ bad input

def _bad_inputs(tmp_path, corpus):
    """(name, extra flags, expected message) for each bad input the issue lists."""
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n{"text": "d"}\n')
    missing_key = _write_jsonl(tmp_path / "missing_key.jsonl", [{"text": "a"}, {"body": "b"}])
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    (tmp_path / "blank.jsonl").write_text("\n\n")
    broken_model = tmp_path / "broken.model"
    broken_model.write_bytes(b"not a sentencepiece model")
    tokenizer = _tokenizer_flags(corpus)
    return [
        ("missing file", ["--input", tmp_path / "nope.jsonl", *tokenizer], r"--input .*nope\.jsonl: no such file"),
        ("malformed json", ["--input", malformed, *tokenizer, "--workers", "2"], r"malformed\.jsonl:3: malformed JSON"),
        ("missing key", ["--input", missing_key, *tokenizer], r"missing_key\.jsonl:2: no key 'text' \(keys: body\)"),
        ("empty corpus", ["--input", empty, *tokenizer], r"empty\.jsonl: no documents"),
        ("blank corpus", ["--input", tmp_path / "blank.jsonl", *tokenizer], r"blank\.jsonl: no documents"),
        ("unreadable tokenizer", ["--input", good, "--tokenizer-type", "SentencePieceTokenizer",
                                  "--tokenizer-model", broken_model], r"cannot load SentencePiece model .*broken\.model"),
        ("wrong key for parquet", ["--input", _write_inputs(tmp_path / "in")["parquet"], "--json-keys", "body", *tokenizer],
         r"a\.parquet: no column 'body' \(columns: id, text\)"),
        ("unknown flag", ["--input", good, *tokenizer, "--bogus"], r"unrecognized arguments: --bogus"),
    ]


def test_bad_input_gives_one_line_exit_2_and_leaves_everything_as_it_was(tmp_path, run_tool, builtin_corpus_small):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    # An earlier, good output under the same prefix must survive every failed run untouched.
    good = _write_jsonl(inputs / "earlier.jsonl", [{"text": "earlier output"}])
    assert run_tool("preprocess_data.py", "--input", good, "--output-prefix", out / "corpus",
                    *_tokenizer_flags(builtin_corpus_small)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for name, flags, message in _bad_inputs(inputs, builtin_corpus_small):
        completed = run_tool("preprocess_data.py", "--output-prefix", out / "corpus", *flags)
        assert completed.returncode == 2, (name, completed.stderr)
        assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr, (name, completed.stderr)
        assert __import__("re").search(message, completed.stderr), (name, completed.stderr)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, name


def test_config_validates_itself(builtin_corpus_small, tmp_path):
    tokenizer = _tokenizer_config(builtin_corpus_small)
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        PreprocessConfig(input="x", output_prefix="y", tokenizer=tokenizer, workers=0)
    with pytest.raises(ValueError, match="distinct field names"):
        PreprocessConfig(input="x", output_prefix="y", tokenizer=tokenizer, json_keys=["a", "a"])
    with pytest.raises(ValueError, match="not a folder"):
        PreprocessConfig(input="x", output_prefix=str(tmp_path), tokenizer=tokenizer)
