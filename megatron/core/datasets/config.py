"""The dataset config (`GPTDatasetConfig`) and the Megatron data flags that fill it.

`--data-path` follows Megatron: either prefixes alone (`A B`, blended in proportion to their token
counts) or weight / prefix pairs (`0.7 A 0.3 B`, weights normalised). `--split` gives the
train / valid / test shares of each dataset's documents ("969,30,1", or "98/2/0").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

SPLIT_NAMES = ("train", "valid", "test")


@dataclass(kw_only=True)
class GPTDatasetConfig:
    data_path: list[str]
    seq_length: int
    split: str = "969,30,1"
    seed: int = 1234
    data_cache_path: str | None = None  # None: a cache/ folder beside each dataset
    eod_mask_loss: bool = False
    # Derived in __post_init__, not set by callers.
    blend: list[tuple[str, float | None]] = field(init=False)
    split_weights: tuple[float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        # A YAML file may give either form: "0.7 A 0.3 B" or [0.7, A, 0.3, B].
        items = self.data_path.split() if isinstance(self.data_path, str) else self.data_path
        self.data_path = [str(item) for item in items]
        self.split = str(self.split)
        self.blend = parse_data_path(self.data_path)
        self.split_weights = parse_split(self.split)


def parse_data_path(data_path: list[str]) -> list[tuple[str, float | None]]:
    """[(prefix, weight)] from Megatron's `--data-path`; weights None when only prefixes are given."""
    if not data_path:
        raise ValueError("--data-path is empty; give a prefix (data/corpus_text_document) or weight/prefix pairs")
    weights = [_as_float(item) for item in data_path]
    if all(w is None for w in weights):
        return [(prefix, None) for prefix in data_path]
    if len(data_path) % 2 or any(w is None for w in weights[::2]) or any(w is not None for w in weights[1::2]):
        raise ValueError(
            "--data-path mixes weights and prefixes; give either prefixes only (A B) or pairs (0.7 A 0.3 B)"
        )
    blend = [(prefix, weight) for weight, prefix in zip(weights[::2], data_path[1::2])]
    for (prefix, weight), text in zip(blend, data_path[::2]):
        if not math.isfinite(weight):
            raise ValueError(f"--data-path weight {text!r} of {prefix} is not a finite number; give positive "
                             "weights, e.g. 0.7 A 0.3 B")
    if any(weight <= 0 for _, weight in blend):
        raise ValueError("--data-path weights must be positive; drop a dataset instead of giving it weight 0")
    total = sum(weight for _, weight in blend)
    return [(prefix, weight / total) for prefix, weight in blend]


def parse_split(split: str) -> tuple[float, float, float]:
    """Normalised train / valid / test shares; missing trailing shares are 0, as in Megatron."""
    parts = [part for part in re.split(r"[,/]", split.strip()) if part.strip()]
    values = [_as_float(part) for part in parts]
    if not 1 <= len(values) <= 3 or any(v is None or not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"--split {split!r}: give up to three non-negative numbers, e.g. 969,30,1")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"--split {split!r}: the shares sum to 0; give the training split a positive share")
    return tuple(v / total for v in values)


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
