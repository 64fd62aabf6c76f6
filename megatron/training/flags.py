"""The machinery of `megatron.training.config`: a flag is a typed dataclass field, a section is a
frozen dataclass of flags that can add itself to an argparse parser and be built from its result.
Kept free of torch, with the tokenizer's and the parallel layout's sections, so that tools which only tokenize (and their
worker processes) start fast.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import yaml

from megatron.core.tokenizers.tokenizer import TOKENIZER_TYPES, TokenizerConfig


def flag(default: Any = None, help: str = "", *, choices=None, negatable: bool = False, nargs=None,
         metavar=None, auto: bool = False) -> Any:
    """A field that is a command-line flag. Booleans are switches (``--x``), or ``--x/--no-x``
    with `negatable`; a list takes `nargs` values (default any number) of its element type. With
    `auto`, the word ``auto`` stands for None (the run works the value out)."""
    return field(default=default, metadata={"help": help, "choices": choices, "negatable": negatable,
                                            "nargs": nargs, "metavar": metavar, "auto": auto})


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
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: checked_value(f, hints[f.name], values[f.name]) for f in fields(cls) if f.name in values})


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
        kwargs["nargs"] = meta.get("nargs") or "*"
        element = _element_type(hint)
        if element in (int, float):
            kwargs["type"] = element
    elif base in (int, float):
        kwargs["type"] = _or_auto(base) if meta.get("auto") else base
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    return kwargs


def _or_auto(base):
    def parse(text: str):
        return None if text == "auto" else base(text)
    parse.__name__ = base.__name__  # argparse names the type in its error line
    return parse


def _element_type(hint):
    """int for ``list[int] | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    args = typing.get_args(hint)
    return args[0] if args else None


def _base_type(hint):
    """int for ``int | None``, list for ``list[str] | None``, ..."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def checked_value(f, hint, value):
    """`value` as field `f`'s type, or a ValueError naming the flag. The command line's values are
    already typed by argparse; a --config YAML file's are not (argparse converts only strings,
    and checks no choices, for defaults): lists, mappings, booleans for numbers, fractions for
    counts, NaN, or a value outside the choices are refused here instead of crashing later or
    being taken silently."""
    name = "--" + f.name.replace("_", "-")
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    inner = next(arg for arg in typing.get_args(hint) if arg is not type(None)) if optional else hint
    base, element = typing.get_origin(inner) or inner, (typing.get_args(inner) or (str,))[0]
    if value == "auto" and f.metadata.get("auto"):
        value = None
    if value is None:
        if optional or f.default is None:
            return None
        raise ValueError(f"{name} needs a value, got null; fix it in the --config file")
    if base is list:
        items = value.split() if isinstance(value, str) else value
        checked = [_as_type(element, v) for v in items] if isinstance(items, (list, tuple)) else _INVALID
        wanted = f"a list of {_PLURAL_NAMES.get(element, element.__name__)}"
    else:
        checked, wanted = _as_type(base, value), _KIND_NAMES.get(base, getattr(base, "__name__", str(base)))
    if checked is _INVALID or isinstance(checked, list) and _INVALID in checked:
        raise ValueError(f"{name} expects {wanted}, got {value!r}; fix it in the --config file")
    choices = f.metadata.get("choices")
    if choices and any(v not in choices for v in (checked if base is list else [checked])):
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return checked


_INVALID = object()
_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
_PLURAL_NAMES = {bool: "true / false values", int: "whole numbers", float: "numbers", str: "strings"}


def _as_type(base, value):
    """`value` as `base` (bool, int, float or str), or _INVALID."""
    if base is bool:
        return value if isinstance(value, bool) else _INVALID
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return _INVALID  # lists, mappings, dates, and booleans where a number or a name belongs
    if base is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) else _INVALID
    if base is float:
        return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else _INVALID
    if base is str:
        return str(value)
    return value


def check_positive(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass(frozen=True)
class TokenizerArgs(Section):
    title: ClassVar[str] = "tokenizer"
    tokenizer_type: str | None = flag(
        None, "which tokenizer reads --tokenizer-model (default GPT2BPETokenizer with --vocab-file and "
              "--merge-file)", choices=TOKENIZER_TYPES)
    tokenizer_model: str | None = flag(
        None, "SentencePiece .model file, or tokenizer.json (or its folder) for HuggingFaceTokenizer")
    vocab_size: int | None = flag(None, "number of ids for NullTokenizer (EOD is one more)")
    vocab_file: str | None = flag(None, "GPT2BPETokenizer: GPT-2's vocab.json (gpt2-vocab.json)")
    merge_file: str | None = flag(None, "GPT2BPETokenizer: GPT-2's merges.txt (gpt2-merges.txt)")

    def __post_init__(self) -> None:
        if self.tokenizer_type is None and self.vocab_file and self.merge_file:
            # The only kind that reads those two files (Megatron-LM's GPT scripts give no type);
            # resolved here so that checkpoints record it.
            object.__setattr__(self, "tokenizer_type", "GPT2BPETokenizer")

    def tokenizer_config(self) -> TokenizerConfig:
        tokenizer_type = self.tokenizer_type
        if tokenizer_type is None:
            raise ValueError("no tokenizer given; pass --tokenizer-type and --tokenizer-model (or --vocab-file and "
                             "--merge-file for GPT-2's BPE)")
        return TokenizerConfig(tokenizer_type=tokenizer_type, tokenizer_model=self.tokenizer_model,
                               vocab_size=self.vocab_size, vocab_file=self.vocab_file, merge_file=self.merge_file)


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """The YAML file's values keyed by flag name; unknown keys are an error."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in dests or dest == "config":
            raise ValueError(f"--config {path}: unknown key {key!r}; keys are flag names such as num_layers")
        defaults[dest] = value
    return defaults


@dataclass(frozen=True)
class ParallelArgs(Section):
    title: ClassVar[str] = "parallelism"
    tensor_model_parallel_size: int = flag(1)
    pipeline_model_parallel_size: int = flag(1)
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        None, "interleaved 1F1B: layers per model chunk (several chunks per stage)")
    sequence_parallel: bool = flag(False, "split activations along the sequence across the tensor-parallel "
                                          "group (no effect at --tensor-model-parallel-size 1)")
    use_distributed_optimizer: bool = flag(False)
    ddp_bucket_size: int | None = flag(None, "parameters per data-parallel gradient bucket (default: 40 MB of FP32 "
                                             "gradients; FP8 ZeRO's buckets: 40 MB of FP8)")
    overlap_grad_reduce: bool = flag(False, "reduce each gradient bucket (dense and FP8) while backward goes on, "
                                            "on a communication thread; same results to the bit")
    overlap_param_gather: bool = flag(False, "with the distributed optimizer (or O3 at DP > 1): all-gather the "
                                             "updated weights on the communication thread, each bucket waited "
                                             "for by the next forward that reads it")

    def __post_init__(self) -> None:
        check_positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "num_layers_per_virtual_pipeline_stage", "ddp_bucket_size")
