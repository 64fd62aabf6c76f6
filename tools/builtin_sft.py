"""The built-in instruction set: questions about the Python standard library with checkable answers,
made from the running interpreter's own modules (nothing downloaded).

For every public function and class of a fixed list of standard-library modules, three questions:

    Which module does `json.dumps` come from?          -> json
    What is `json.dumps` called without its module?    -> dumps
    Is `json.JSONDecoder` a class or a function?       -> class

Names are split by a hash of the qualified name: about 10% are held out (their questions form
the test set), so exact match on the test set measures what generalises - reading the module and
the name off the question, telling classes from functions by their names - not recall.

    python tools/builtin_sft.py                  # data/builtin-sft/: train.jsonl, test.jsonl and their SFT files
    python tools/builtin_sft.py --print-args     # the finetune_sft.py data and tokenizer flags, on stdout

The tokenizer is the built-in corpus's (`tools/builtin_corpus.py`, built first when missing);
train.jsonl is preprocessed to data/builtin-sft/train and test.jsonl to train-valid (the SFT
validation split). A later call returns at once when the folder is up to date.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import shutil
import sys
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.core.datasets.sft_dataset import VALID_SUFFIX  # noqa: E402
from megatron.core.datasets.sft_preprocessing import SFTPreprocessConfig, preprocess_sft  # noqa: E402
from megatron.core.tokenizers.tokenizer import TokenizerConfig  # noqa: E402
from tools import OneLineErrorParser, run_cli  # noqa: E402
from tools.builtin_corpus import REPO_ROOT, ensure_builtin_corpus  # noqa: E402

BUILD_FORMAT = 1
MODULES = ("json", "os", "os.path", "re", "math", "string", "collections", "itertools", "functools", "random",
           "datetime", "pathlib", "shutil", "textwrap", "heapq", "bisect", "statistics", "fractions", "decimal",
           "operator", "copy", "pprint", "csv", "base64", "hashlib", "struct", "time", "calendar", "glob",
           "fnmatch", "tempfile", "io", "uuid", "urllib.parse", "html", "zlib", "gzip", "difflib", "enum",
           "typing", "inspect", "argparse", "logging", "threading", "queue", "socket", "sqlite3", "zipfile",
           "tarfile", "unicodedata", "array", "contextlib", "dataclasses", "abc", "numbers", "secrets", "shlex",
           "signal", "subprocess", "sys", "traceback", "types", "weakref", "warnings", "codecs", "locale",
           "platform", "pickle", "email.utils", "http.client", "xml.etree.ElementTree")
TEMPLATES = (
    ("Which module does `{qualified}` come from?", lambda module, name, kind: module),
    ("What is `{qualified}` called without its module?", lambda module, name, kind: name),
    ("Is `{qualified}` a class or a function?", lambda module, name, kind: kind),
)
HELD_OUT_PERCENT = 10
SEQ_LENGTH = 128


def stdlib_names() -> list[tuple[str, str, str]]:
    """(module, name, "class" or "function") of the public callables of MODULES, sorted."""
    found = set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module this interpreter was built without
            continue
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name, None)
            if name.startswith("_") or obj is None:
                continue
            if inspect.isclass(obj):
                found.add((module_name, name, "class"))
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                found.add((module_name, name, "function"))
    return sorted(found)


def held_out(module: str, name: str) -> bool:
    return zlib.crc32(f"{module}.{name}".encode()) % 100 < HELD_OUT_PERCENT


def records(names) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for module, name, kind in names:
        for question, answer in TEMPLATES:
            record = {"messages": [{"role": "user", "content": question.format(qualified=f"{module}.{name}")},
                                   {"role": "assistant", "content": answer(module, name, kind)}]}
            (test if held_out(module, name) else train).append(record)
    return train, test


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def ensure_builtin_sft(data_dir: str | Path | None = None, *, log=None) -> dict:
    """Build data/builtin-sft (or `data_dir`) unless up to date; returns its manifest."""
    log = log or (lambda message: None)
    target = Path(data_dir) if data_dir else REPO_ROOT / "data" / "builtin-sft"
    corpus = ensure_builtin_corpus(log=log)
    names = stdlib_names()
    fingerprint = hashlib.sha256(json.dumps([BUILD_FORMAT, SEQ_LENGTH, names, corpus.manifest.get("fingerprint")])
                                 .encode()).hexdigest()[:16]
    manifest_path = target / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            log(f"built-in instruction set in {target} is up to date")
            return manifest
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    train, test = records(names)
    _write_jsonl(staging / "train.jsonl", train)
    _write_jsonl(staging / "test.jsonl", test)
    tokenizer = TokenizerConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(corpus.tokenizer_model))
    for source, prefix in (("train.jsonl", "train"), ("test.jsonl", "train" + VALID_SUFFIX)):
        preprocess_sft(SFTPreprocessConfig(input=str(staging / source), output_prefix=str(staging / prefix),
                                           tokenizer=tokenizer, seq_length=SEQ_LENGTH))
    manifest = {"fingerprint": fingerprint, "names": len(names), "train_samples": len(train),
                "test_samples": len(test), "tokenizer_model": str(corpus.tokenizer_model)}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log(f"built-in instruction set: {len(train):,} training and {len(test):,} test samples in {target}")
    return manifest


def training_args(data_dir: Path, manifest: dict) -> list[str]:
    return ["--data-path", str(data_dir / "train"), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", manifest["tokenizer_model"]]


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="builtin_sft.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="output folder (default: data/builtin-sft)")
    parser.add_argument("--print-args", action="store_true", help="print the finetune_sft.py data flags only")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    data_dir = Path(args.data_dir) if args.data_dir else REPO_ROOT / "data" / "builtin-sft"
    manifest = ensure_builtin_sft(data_dir, log=log)
    if args.print_args:
        print(" ".join(training_args(data_dir, manifest)))
    else:
        print(f"train: {data_dir / 'train.jsonl'} ({manifest['train_samples']:,} samples)\n"
              f"test:  {data_dir / 'test.jsonl'} ({manifest['test_samples']:,} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
