"""Rewards as Python functions (`--reward-fn module:function`), for tasks whose answers can be checked.

A reward function takes the completions (decoded text, the end-of-document token removed) and the
prompt records they answer (the JSON objects of the prompt file, with any fields the task needs,
such as a reference answer) and returns one finite number per completion:

    def reward(completions: list[str], records: list[dict]) -> list[float]

For the built-in task (`tools/builtin_rlhf.py`, records with an "answer"): `builtin_exact_match`
gives 1 when the completion, stripped of surrounding white space, equals the answer, else 0;
`builtin_similarity` gives partial credit, the similarity of the two strings (difflib's ratio,
1.0 when equal), so that every group of samples carries a signal.
"""

from __future__ import annotations

import difflib
import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

RewardFn = Callable[[list[str], list[dict]], list[float]]


def builtin_exact_match(completions: list[str], records: list[dict]) -> list[float]:
    return [float(text.strip() == str(record["answer"]).strip()) for text, record in zip(completions, records)]


def builtin_similarity(completions: list[str], records: list[dict]) -> list[float]:
    return [difflib.SequenceMatcher(None, text.strip(), str(record["answer"]).strip()).ratio()
            for text, record in zip(completions, records)]


def load_reward_fn(spec: str) -> RewardFn:
    """The function `spec` names ("package.module:function"; the working directory and the
    repository root are importable). One-line errors name what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward-fn {spec!r}: expected MODULE:FUNCTION, e.g. rlhf.rewards:builtin_exact_match")
    for root in (str(Path.cwd()), str(Path(__file__).resolve().parent.parent)):
        if root not in sys.path:
            sys.path.append(root)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module's, reported in one line
        raise ValueError(f"--reward-fn {spec}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
                         f"check the module name and that it imports") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec}: {module_name} has no function {attr!r}")
    return fn


def score(fn: RewardFn, spec: str, completions: list[str], records: list[dict]) -> tuple[list[float], str | None]:
    """(one float per completion, None) or ([], the one-line reason the reward function failed):
    it raised, returned the wrong number of values, or a value that is not a finite number. The
    caller shares the reason with every rank before anyone stops, so no rank waits forever."""
    try:
        values = list(fn(list(completions), list(records)))
    except Exception as exc:  # noqa: BLE001 - the user's function: any failure becomes one line
        text = str(exc).strip().splitlines()
        return [], f"--reward-fn {spec} raised {type(exc).__name__}: {text[0] if text else ''}; fix the function"
    if len(values) != len(completions):
        return [], (f"--reward-fn {spec} returned {len(values)} values for {len(completions)} completions; "
                    f"it must return one number per completion")
    out = []
    for index, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return [], f"--reward-fn {spec} returned {value!r} for completion {index}; it must return numbers"
        if not math.isfinite(number):
            return [], (f"--reward-fn {spec} returned {number} for completion {index}; rewards must be finite "
                        f"numbers")
        out.append(number)
    return out, None
