"""Tokenize instruction data (conversations) for supervised fine-tuning: token ids and a loss mask.

    python tools/preprocess_sft.py --input chats.jsonl --output-prefix data/my-sft \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model hf/model --seq-length 2048 \
        --valid-fraction 0.01 --workers 8

--input: a .jsonl / .json / .parquet file (JSON optionally .gz), a glob, a folder of such files, or a
folder written by `datasets.Dataset.save_to_disk`; records in prompt/response, Alpaca, chat
(`messages`) or ShareGPT (`conversations`) form. Writes PREFIX_tokens_document.bin/.idx,
PREFIX_loss_mask_document.bin/.idx (1 = a target token: assistant text and its end of turn),
PREFIX-valid_* with --valid-fraction, and PREFIX_sft_stats.json. See docs/sft_data.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.core.datasets.sft_formats import FORMATS, FieldNames  # noqa: E402
from megatron.core.datasets.sft_preprocessing import (  # noqa: E402
    OVERLONG_CHOICES, SFTPreprocessConfig, preprocess_sft,
)
from megatron.training.flags import TokenizerArgs  # noqa: E402
from tools import OneLineErrorParser, run_cli  # noqa: E402

_KEY_FLAGS = {  # FieldNames field: help
    "prompt": "prompt/response: the prompt field (default prompt)",
    "response": "prompt/response: the response field (default response)",
    "instruction": "Alpaca: the instruction field (default instruction)",
    "input": "Alpaca: the optional input field, appended to the instruction after a blank line (default input)",
    "output": "Alpaca: the answer field (default output)",
    "messages": "chat / ShareGPT: the message list (default messages / conversations)",
    "role": "chat / ShareGPT: a message's role field (default role / from)",
    "content": "chat / ShareGPT: a message's text field (default content / value)",
    "system": "any format: an optional top-level system prompt field (default system)",
}


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="preprocess_sft.py", description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="file, glob, folder, or saved Hugging Face dataset folder")
    group.add_argument("--sft-format", choices=("auto",) + FORMATS, default="auto",
                       help="record layout; auto tells it from each file's first record")
    for name, text in _KEY_FLAGS.items():
        group.add_argument(f"--{name}-key", dest=f"{name}_key", default=None, metavar="FIELD", help=text)
    TokenizerArgs.add_to(parser)
    group = parser.add_argument_group("template and length")
    group.add_argument("--chat-template", default="auto", metavar="auto|default|FILE",
                       help="auto: the Hugging Face tokenizer's own chat template, else the default one; "
                            "default: the built-in <|user|> / <|assistant|> layout; FILE: a Jinja template")
    group.add_argument("--seq-length", type=int, required=True,
                       help="training sequence length; a sample may hold seq-length + 1 tokens")
    group.add_argument("--overlong", choices=OVERLONG_CHOICES, default="drop",
                       help="samples longer than that: drop them, or keep their first seq-length + 1 tokens")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    group.add_argument("--valid-fraction", type=float, default=0.0,
                       help="fraction of the records written to PREFIX-valid_* instead (a seeded choice)")
    group.add_argument("--seed", type=int, default=1234, help="seed of the validation choice")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any number)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: getattr(args, f"{name}_key") for name in _KEY_FLAGS}
    if overrides["system"] is None:
        del overrides["system"]
    config = SFTPreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, tokenizer=TokenizerArgs.from_namespace(args).tokenizer_config(),
        seq_length=args.seq_length, sft_format=args.sft_format, field_names=FieldNames(**overrides),
        chat_template=args.chat_template, overlong=args.overlong, valid_fraction=args.valid_fraction,
        seed=args.seed, workers=args.workers,
    )
    result = preprocess_sft(config)
    for path in result.files:
        print(f"wrote {path}")
    stats = result.stats
    dropped = ", ".join(f"{reason} {count:,}" for reason, count in stats["dropped"].items())
    per_split = ", ".join(f"{name} {split['samples']:,}" for name, split in stats["splits"].items())
    print(f"{stats['samples_read']:,} samples read, {stats['samples_written']:,} written ({per_split}), "
          f"{stats['samples_dropped']:,} dropped ({dropped}), {stats['samples_truncated']:,} truncated; "
          f"{stats['tokens']:,} tokens, {stats['assistant_tokens']:,} of them targets; "
          f"template {stats['chat_template']}; {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
