"""Tokenize a corpus into Megatron indexed datasets (`PREFIX_{key}_document.bin` / `.idx`).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my-corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model \
        --append-eod --workers 8

--input: a .jsonl / .json / .parquet / .txt file (optionally .gz, except Parquet), a glob, a folder
of such files, or a folder written by `datasets.Dataset.save_to_disk`. See docs/data.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.core.datasets.corpus_readers import TXT_MODES  # noqa: E402
from megatron.core.datasets.preprocessing import PreprocessConfig, preprocess  # noqa: E402
from megatron.training.flags import TokenizerArgs  # noqa: E402
from tools import OneLineErrorParser, run_cli  # noqa: E402


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="preprocess_data.py", description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="file, glob, folder, or saved Hugging Face dataset folder")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="fields to tokenize; each gets its own PREFIX_{key}_document.bin/.idx")
    group.add_argument("--txt-mode", choices=TXT_MODES, default="line",
                       help="documents in .txt input: one per line, per blank-line paragraph, or per file")
    group.add_argument("--keep-empty", action="store_true", help="keep records whose fields are all empty")
    TokenizerArgs.add_to(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    group.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any number)")
    group.add_argument("--dataset-impl", choices=["mmap"], default="mmap",
                       help="accepted for old Megatron scripts; the memory-mapped format is the only one")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a terminal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, tokenizer=TokenizerArgs.from_namespace(args).tokenizer_config(),
        json_keys=args.json_keys, append_eod=args.append_eod, keep_empty=args.keep_empty,
        workers=args.workers, txt_mode=args.txt_mode, show_progress=False if args.no_progress else None,
    )
    result = preprocess(config)
    for prefix in result.output_prefixes.values():
        print(f"wrote {prefix}.bin and {prefix}.idx")
    print(
        f"{result.num_documents:,} documents ({result.num_skipped:,} empty skipped), {result.num_tokens:,} tokens "
        f"as {result.dtype} in {result.seconds:.1f} s: {result.documents_per_second:,.0f} documents/s, "
        f"{result.tokens_per_second:,.0f} tokens/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
