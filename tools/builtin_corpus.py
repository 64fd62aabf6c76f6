"""The built-in corpus: real text that every Python installation carries, ready to train on.

Documents are the interpreter's own documentation topics (`pydoc_data`) and the standard library's
`.py` sources (test suites left out). This tool writes them as JSON lines, trains a SentencePiece
tokenizer on them, and tokenizes them into a Megatron indexed dataset:

    python tools/builtin_corpus.py                 # data/builtin/, about 4M tokens, ~10 s on 2 cores
    python tools/builtin_corpus.py --variant small # data/builtin-small/, for tests
    python tools/builtin_corpus.py --print-args    # the training flags that use it, on stdout

A later call returns at once when the folder is up to date (same sources, same settings). The build
happens in a temporary folder that replaces the old one only when complete, under a file lock, so
concurrent callers (e.g. several ranks) build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetError  # noqa: E402
from megatron.core.datasets.preprocessing import PreprocessConfig, preprocess  # noqa: E402
from megatron.core.tokenizers.tokenizer import (  # noqa: E402
    SentencePieceTrainingConfig, TokenizerConfig, train_sentencepiece,
)
from tools import OneLineErrorParser, run_cli  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Bump when the build procedure changes, so existing folders are rebuilt rather than reused.
BUILD_FORMAT = 1
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Variant:
    vocab_size: int
    max_stdlib_bytes: int | None  # None: every standard-library source file
    default_dir: str


VARIANTS = {
    "full": Variant(vocab_size=4096, max_stdlib_bytes=None, default_dir="data/builtin"),
    "small": Variant(vocab_size=1024, max_stdlib_bytes=600_000, default_dir="data/builtin-small"),
}


@dataclass(frozen=True)
class BuiltinCorpus:
    """Where the built corpus lives; `training_args()` gives the flags for pretrain_gpt.py."""

    data_dir: Path
    data_prefix: Path
    tokenizer_model: Path
    corpus_jsonl: Path
    manifest: dict

    def training_args(self) -> list[str]:
        return ["--data-path", str(self.data_prefix), "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", str(self.tokenizer_model)]


def corpus_files(data_dir: Path) -> dict[str, Path]:
    return {
        "corpus_jsonl": data_dir / "corpus.jsonl",
        "tokenizer_model": data_dir / "tokenizer.model",
        "data_prefix": data_dir / "builtin_text_document",
        "manifest": data_dir / "manifest.json",
    }


def ensure_builtin_corpus(data_dir: str | os.PathLike | None = None, *, variant: str = "full",
                          workers: int | None = None, force: bool = False, log=None) -> BuiltinCorpus:
    """Build the corpus in `data_dir` unless it is already up to date there; return its paths."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown corpus variant {variant!r}; use one of {', '.join(VARIANTS)}")
    log = log or _silent
    target = Path(data_dir) if data_dir else REPO_ROOT / VARIANTS[variant].default_dir
    sources = collect_sources(VARIANTS[variant])
    fingerprint = _fingerprint(variant, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if not force and _is_up_to_date(target, fingerprint):
            log(f"built-in corpus in {target} is up to date")
        else:
            _build(target, variant, sources, fingerprint, workers or min(2, os.cpu_count() or 1), log)
    return _load(target)


def _silent(message: str) -> None:
    pass


# ------------------------------------------------------------------------------------ sources

@dataclass(frozen=True)
class SourceFile:
    name: str  # "pydoc:<topic>" or "stdlib:<relative path>"
    path: Path | None
    size: int
    mtime_ns: int


def collect_sources(variant: Variant) -> list[SourceFile]:
    """The documents of a variant, in a fixed order, identified by cheap file metadata."""
    sources = [SourceFile(f"pydoc:{topic}", None, 0, 0) for topic in sorted(_pydoc_topics())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        relative = path.relative_to(stdlib)
        if _EXCLUDED_PARTS.intersection(relative.parts):
            continue
        if variant.max_stdlib_bytes is not None and total >= variant.max_stdlib_bytes:
            break
        stat = path.stat()
        sources.append(SourceFile(f"stdlib:{relative.as_posix()}", path, stat.st_size, stat.st_mtime_ns))
        total += stat.st_size
    if len(sources) < 20:
        raise ValueError(f"found only {len(sources)} documents in pydoc_data and {stdlib}; this Python "
                         "installation lacks its documentation and library sources, install the full stdlib")
    return sources


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data into a separate package
        return {}
    return topics


def read_documents(sources: list[SourceFile]) -> Iterator[dict]:
    topics = _pydoc_topics()
    for source in sources:
        if source.path is None:
            text = topics[source.name.removeprefix("pydoc:")]
        else:
            try:
                text = source.path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):  # a few files carry other encodings; they are not needed
                continue
        if text.strip():
            yield {"text": text, "source": source.name}


def _fingerprint(variant: str, sources: list[SourceFile]) -> str:
    digest = hashlib.sha256()
    settings = {"format": BUILD_FORMAT, "variant": asdict(VARIANTS[variant]), "python": sys.version}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(hashlib.sha256(json.dumps(_pydoc_topics(), sort_keys=True).encode()).digest())
    for source in sources:
        digest.update(f"{source.name}\0{source.size}\0{source.mtime_ns}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ building

def _build(target: Path, variant: str, sources: list[SourceFile], fingerprint: str, workers: int, log) -> None:
    started = time.perf_counter()
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build_into(staging, variant, sources, workers, log)
        manifest.update(fingerprint=fingerprint, build_seconds=round(time.perf_counter() - started, 2))
        corpus_files(staging)["manifest"].write_text(json.dumps(manifest, indent=1) + "\n")
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"built the {variant} built-in corpus in {target} in {time.perf_counter() - started:.1f} s: "
        f"{manifest['num_documents']:,} documents, {manifest['num_tokens']:,} tokens")


def _build_into(folder: Path, variant: str, sources: list[SourceFile], workers: int, log) -> dict:
    show_progress = None if log is not _silent else False  # a bar only for callers that want messages
    files = corpus_files(folder)
    log(f"writing {files['corpus_jsonl'].name} from {len(sources)} sources")
    num_bytes = 0
    with open(files["corpus_jsonl"], "w", encoding="utf-8") as jsonl:
        for document in read_documents(sources):
            jsonl.write(json.dumps(document, ensure_ascii=False) + "\n")
            num_bytes += len(document["text"].encode("utf-8"))
    vocab_size = VARIANTS[variant].vocab_size
    log(f"training a {vocab_size}-piece SentencePiece tokenizer on {num_bytes / 1e6:.1f} MB")
    # The thread count is recorded inside the .model file, so it is fixed; even so SentencePiece's
    # BPE trainer gives another model in another process (docs/data.md), so builds are not identical.
    train_sentencepiece(_jsonl_texts(files["corpus_jsonl"]), folder / "tokenizer", SentencePieceTrainingConfig(
        vocab_size=vocab_size, max_sentences=200_000, num_threads=2))
    log(f"tokenizing with {workers} worker(s)")
    result = preprocess(PreprocessConfig(
        input=str(files["corpus_jsonl"]), output_prefix=str(folder / "builtin"), append_eod=True, workers=workers,
        tokenizer=TokenizerConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(files["tokenizer_model"])),
        show_progress=show_progress))
    return {"format": BUILD_FORMAT, "variant": variant, "python": sys.version.split()[0], "vocab_size": vocab_size,
            "num_documents": result.num_documents, "num_tokens": result.num_tokens, "text_bytes": num_bytes,
            "tokenize_seconds": round(result.seconds, 2)}


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as jsonl:
        for line in jsonl:
            yield json.loads(line)["text"]


def _replace_dir(staging: Path, target: Path) -> None:
    # A rename cannot replace a non-empty folder: move the old one aside first, then drop it.
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def _exclusive_lock(lock_path: Path):
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_up_to_date(target: Path, fingerprint: str) -> bool:
    files = corpus_files(target)
    try:
        manifest = json.loads(files["manifest"].read_text())
        IndexedDataset(files["data_prefix"]).close()
    except (OSError, ValueError, IndexedDatasetError):
        return False
    return manifest.get("fingerprint") == fingerprint and files["tokenizer_model"].is_file()


def _load(target: Path) -> BuiltinCorpus:
    files = corpus_files(target)
    manifest = json.loads(files["manifest"].read_text())
    return BuiltinCorpus(data_dir=target, data_prefix=files["data_prefix"], tokenizer_model=files["tokenizer_model"],
                         corpus_jsonl=files["corpus_jsonl"], manifest=manifest)


# ------------------------------------------------------------------------------------ command line

def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="builtin_corpus.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="output folder (default: data/builtin or data/builtin-small)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: up to 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--print-args", action="store_true",
                        help="print only the --data-path / --tokenizer-* flags for training, on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be >= 1")
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    corpus = ensure_builtin_corpus(args.data_dir, variant=args.variant, workers=args.workers, force=args.force, log=log)
    if args.print_args:
        print(" ".join(corpus.training_args()))
    else:
        print(f"data prefix:     {corpus.data_prefix}\ntokenizer model: {corpus.tokenizer_model}\n"
              f"corpus:          {corpus.corpus_jsonl} ({corpus.manifest['num_documents']:,} documents, "
              f"{corpus.manifest['num_tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
