"""The machinery of `megatron.training.config`: a flag is a typed dataclass field, a section is a
frozen dataclass of flags that can add itself to an argparse parser and be built from its result.
Kept free of torch, with the tokenizer's section, so that tools which only tokenize (and their
worker processes) start fast.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from megatron.core.tokenizers.tokenizer import TOKENIZER_TYPES, TokenizerConfig


def flag(default: Any = None, help: str = "", *, choices=None, negatable: bool = False) -> Any:
    """A field that is a command-line flag. Booleans are switches (``--x``), or ``--x/--no-x``
    with `negatable`."""
    return field(default=default, metadata={"help": help, "choices": choices, "negatable": negatable})


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str):
        raise ValueError(f"{message} (see --help)")


class Section:
    """A group of flags; subclasses are frozen dataclasses of `flag` fields."""

    title: ClassVar[str]

    @classmethod
    def add_to(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(cls.title)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_argparse_kwargs(f, hints[f.name]))

    def fills_later(self) -> set[str]:
        """Required flags of the run that this section will work out itself once the run knows
        more (an entry point's --num-epochs sets --train-iters from the data): the run
        configuration does not ask for them."""
        return set()

    @classmethod
    def from_namespace(cls, values: argparse.Namespace | dict) -> Section:
        values = vars(values) if isinstance(values, argparse.Namespace) else values
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def _argparse_kwargs(f, hint) -> dict:
    meta = f.metadata
    kwargs = {"default": f.default if f.default is not MISSING else None, "help": meta.get("help") or None}
    base = _base_type(hint)
    if base is bool:
        if meta.get("negatable") or f.default is not False:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["action"] = "store_true"
        return kwargs
    if meta.get("choices"):
        kwargs["choices"] = list(meta["choices"])
    if base is list:
        kwargs["nargs"] = "*"
    elif base in (int, float):
        kwargs["type"] = base
    return kwargs


def _base_type(hint):
    """int for ``int | None``, list for ``list[str] | None``, ..."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def check_positive(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass(frozen=True)
class TokenizerArgs(Section):
    title: ClassVar[str] = "tokenizer"
    tokenizer_type: str | None = flag(None, "which tokenizer reads --tokenizer-model", choices=TOKENIZER_TYPES)
    tokenizer_model: str | None = flag(
        None, "SentencePiece .model file, or tokenizer.json (or its folder) for HuggingFaceTokenizer")
    vocab_size: int | None = flag(None, "number of ids for NullTokenizer (EOD is one more)")

    def tokenizer_config(self) -> TokenizerConfig:
        if self.tokenizer_type is None:
            raise ValueError("no tokenizer given; pass --tokenizer-type and --tokenizer-model")
        return TokenizerConfig(tokenizer_type=self.tokenizer_type, tokenizer_model=self.tokenizer_model,
                               vocab_size=self.vocab_size)
