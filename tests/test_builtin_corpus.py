"""tools/builtin_corpus.py: contents, reuse when up to date, determinism, repair, command line."""

from __future__ import annotations

import json
import shlex
import time

from megatron.core.datasets.indexed_dataset import IndexedDataset, idx_path
from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.config import parse_config

OUTPUT_FILES = ("builtin_text_document.bin", "builtin_text_document.idx", "tokenizer.model", "corpus.jsonl")


def test_contents_match_the_manifest(builtin_corpus_small):
    manifest = builtin_corpus_small.manifest
    assert manifest["variant"] == "small" and manifest["vocab_size"] == 1024
    dataset = IndexedDataset(builtin_corpus_small.data_prefix)
    assert len(dataset) == manifest["num_documents"] > 50
    assert dataset.num_tokens == manifest["num_tokens"] > 100_000
    with open(builtin_corpus_small.corpus_jsonl, encoding="utf-8") as jsonl:
        sources = [json.loads(line)["source"] for line in jsonl]
    assert any(s.startswith("pydoc:") for s in sources) and any(s.startswith("stdlib:") for s in sources)
    assert not any("/test/" in s or "/tests/" in s for s in sources)
    eod = 2
    assert all(dataset[i][-1] == eod for i in range(len(dataset)))  # documents end with EOD for GPT sampling


def test_second_call_reuses_the_build(builtin_corpus_small, run_tool):
    stamps = {name: (builtin_corpus_small.data_dir / name).stat().st_mtime_ns for name in OUTPUT_FILES}
    started = time.perf_counter()
    completed = run_tool("builtin_corpus.py", "--variant", "small", "--data-dir", builtin_corpus_small.data_dir)
    assert completed.returncode == 0, completed.stderr
    assert "up to date" in completed.stderr and time.perf_counter() - started < 10
    assert {name: (builtin_corpus_small.data_dir / name).stat().st_mtime_ns for name in OUTPUT_FILES} == stamps


def test_print_args_feed_the_training_flags(builtin_corpus_small, run_tool):
    completed = run_tool("builtin_corpus.py", "--variant", "small", "--data-dir", builtin_corpus_small.data_dir,
                         "--print-args")
    assert completed.returncode == 0 and completed.stdout.count("\n") == 1
    args = parse_config([*shlex.split(completed.stdout), "--seq-length", "32", "--num-layers", "1",
                         "--hidden-size", "8", "--num-attention-heads", "1", "--train-iters", "1", "--lr", "1e-3"])
    assert args.data.dataset_config(seed=1).blend == [(str(builtin_corpus_small.data_prefix), None)]
    assert build_tokenizer(args.tokenizer.tokenizer_config()).vocab_size == 1024


def test_rebuild_is_deterministic_and_repairs_damage(builtin_corpus_small, run_tool, tmp_path):
    copy = tmp_path / "corpus"
    completed = run_tool("builtin_corpus.py", "--variant", "small", "--data-dir", copy, "--workers", "1", "--quiet")
    assert completed.returncode == 0, completed.stderr
    for name in OUTPUT_FILES:
        assert (copy / name).read_bytes() == (builtin_corpus_small.data_dir / name).read_bytes(), name
    idx = idx_path(copy / "builtin_text_document")
    idx.write_bytes(idx.read_bytes()[:-8])  # damaged: the next call must notice and rebuild
    completed = run_tool("builtin_corpus.py", "--variant", "small", "--data-dir", copy)
    assert completed.returncode == 0 and "built the small built-in corpus" in completed.stderr
    assert idx.read_bytes() == idx_path(builtin_corpus_small.data_prefix).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".corpus.lock", "corpus"]  # no staging folders left


def test_bad_flags_exit_2_with_one_line(run_tool, tmp_path):
    for flags, message in ((["--variant", "huge"], "invalid choice: 'huge'"), (["--workers", "0"], "--workers must be >= 1")):
        completed = run_tool("builtin_corpus.py", "--data-dir", tmp_path / "x", *flags)
        assert completed.returncode == 2 and completed.stderr.count("\n") == 1 and message in completed.stderr
    assert not (tmp_path / "x").exists()
