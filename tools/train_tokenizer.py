"""Train a SentencePiece tokenizer on local text, with a progress display.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix data/tok --vocab-size 32000

Writes PREFIX.model (for --tokenizer-type SentencePieceTokenizer --tokenizer-model PREFIX.model)
and PREFIX.vocab. The model keeps text byte-exact (no normalisation, whitespace kept, byte
fallback for unseen characters); special ids are unk 0, bos 1, eos/EOD 2, pad 3.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.core.datasets.corpus_readers import TXT_MODES, iter_texts, resolve_sources  # noqa: E402
from megatron.core.tokenizers.tokenizer import SentencePieceTrainingConfig, train_sentencepiece  # noqa: E402
from tools import OneLineErrorParser, run_cli  # noqa: E402


def build_parser() -> OneLineErrorParser:
    defaults = SentencePieceTrainingConfig()
    parser = OneLineErrorParser(prog="train_tokenizer.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, globs or folders (as tools/preprocess_data.py)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="fields of JSON / Parquet records to train on")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="line", help="documents in .txt input")
    parser.add_argument("--model-prefix", required=True, help="output path without .model / .vocab")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--model-type", default=defaults.model_type, choices=["bpe", "unigram", "char", "word"])
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=defaults.byte_fallback,
                        help="encode unseen characters as UTF-8 bytes instead of <unk> (default on)")
    parser.add_argument("--character-coverage", type=float, default=defaults.character_coverage)
    parser.add_argument("--max-sentences", type=int, default=defaults.max_sentences,
                        help="lines sampled for training (a random subset when the corpus has more)")
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = SentencePieceTrainingConfig(
        vocab_size=args.vocab_size, model_type=args.model_type, byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage, max_sentences=args.max_sentences,
        num_threads=args.threads, seed=args.seed,
    )
    sources = [source for pattern in args.input for source in resolve_sources(pattern)]
    texts = iter_texts(sources, args.json_keys, args.txt_mode)
    started = time.perf_counter()
    with TrainingProgress(enabled=not args.no_progress) as progress:
        model_path = train_sentencepiece(progress.wrap(texts), args.model_prefix, config, verbose=args.verbose)
    print(f"wrote {model_path} and {Path(args.model_prefix).name}.vocab: {config.vocab_size} pieces "
          f"({config.model_type}) from {progress.num_texts:,} documents in {time.perf_counter() - started:.1f} s")
    return 0


class TrainingProgress:
    """A documents-read bar while SentencePiece loads text, then an elapsed-time line while it trains.

    SentencePiece releases the GIL while it trains, so a thread can keep the display moving.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.num_texts = 0
        self._bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def wrap(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            self.num_texts += 1
            if self._bar is not None:
                self._bar.update(1)
            yield text
        self._start_training_display()

    def _start_training_display(self) -> None:
        if self._bar is None:
            return
        self._bar.close()
        from tqdm import tqdm

        self._bar = tqdm(desc="training SentencePiece", bar_format="{desc}: {elapsed} elapsed", disable=None)
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._bar.refresh()

    def __enter__(self) -> TrainingProgress:
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc="reading documents", unit="doc", disable=None)
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
