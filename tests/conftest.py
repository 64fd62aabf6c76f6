"""Shared test fixtures. Add new fixtures in their own section below.

Data fixtures: the small variant of the built-in corpus (pydoc topics plus part of the standard
library, a 1024-piece SentencePiece tokenizer, an indexed dataset), built once per test session in
a temporary folder through the real command line tool; `write_hf_tokenizer`, which trains a tiny
byte-level BPE tokenizer.json; and `run_tool`, which runs a script from tools/ the way a user would
and returns the completed process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.builtin_corpus import BuiltinCorpus

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ data

@dataclass(frozen=True)
class BuiltinCorpusPaths(BuiltinCorpus):
    """The built corpus (with `training_args()`), plus its documents for round-trip checks."""

    def documents(self) -> list[str]:
        with open(self.corpus_jsonl, encoding="utf-8") as jsonl:
            return [json.loads(line)["text"] for line in jsonl]


def run_python_tool(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run tools/<script> with this interpreter from the repository root; output captured as text."""
    command = [sys.executable, str(REPO_ROOT / "tools" / script), *map(str, args)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_tool():
    return run_python_tool


@pytest.fixture(scope="session")
def builtin_corpus_small(tmp_path_factory) -> BuiltinCorpusPaths:
    data_dir = tmp_path_factory.mktemp("builtin-small") / "corpus"
    completed = run_python_tool("builtin_corpus.py", "--variant", "small", "--data-dir", data_dir, "--quiet")
    assert completed.returncode == 0, completed.stderr
    return BuiltinCorpusPaths(
        data_dir=data_dir, data_prefix=data_dir / "builtin_text_document",
        tokenizer_model=data_dir / "tokenizer.model", corpus_jsonl=data_dir / "corpus.jsonl",
        manifest=json.loads((data_dir / "manifest.json").read_text()),
    )


def _write_hf_tokenizer(folder: Path, special_tokens=("<|endoftext|>", "<pad>")):
    """Train a 400-token byte-level BPE tokenizer.json in `folder`; returns (path, tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = ["def tokenize(text): return text.split()", "The quick brown fox jumps over the lazy dog."] * 20
    tokenizer.train_from_iterator(lines, trainer)
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path))
    return path, tokenizer


@pytest.fixture(scope="session")
def write_hf_tokenizer():
    return _write_hf_tokenizer


def rlhf_records(path) -> list[dict]:
    """The metrics records, each with its "rlhf" object's values lifted to the top (after checking
    that the task's values are there, as the metrics contract puts them, and only there)."""
    out = []
    for line in open(path):
        record = json.loads(line)
        section = record.pop("rlhf")
        assert not set(section) & set(record), sorted(set(section) & set(record))
        out.append({**record, **section})
    return out
