"""Preference pairs for reward models and DPO: records -> (chosen, rejected) token sequences.

Two record layouts (as preference sets are published):

  flat   {"prompt": str, "chosen": str, "rejected": str}, optional "system"
  chat   {"chosen": [messages], "rejected": [messages]}: two whole conversations that agree up to
         their last assistant turn (the prompt), as Anthropic's HH sets; or {"prompt": [messages],
         "chosen": ..., "rejected": ...} with the answers as a string, one assistant message or a
         list holding one.

Both sides are rendered with the chat template SFT uses (`megatron.core.datasets.chat_template`),
so they share the prompt's tokens, and each side's loss mask marks its answer (DPO's
log-probabilities are summed over it; a reward model reads the last token). Bad records raise a
ValueError whose one line names the record (`FILE:LINE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron.core.datasets.chat_template import ChatTemplate
from megatron.core.datasets.corpus_readers import json_lines
from megatron.core.datasets.sft_formats import check_conversation


@dataclass
class PreferencePair:
    chosen: np.ndarray           # token ids of prompt + chosen answer
    chosen_mask: np.ndarray      # 1 on the chosen (final) answer's tokens and its end of turn
    rejected: np.ndarray
    rejected_mask: np.ndarray
    prompt_tokens: int           # how many leading tokens the two share as the prompt


def _messages(value, where: str, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError(f"{where}: {name!r} must be a string or a list of messages")
    out = []
    for index, message in enumerate(value):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"{where}: {name}[{index}] needs a role (system, user or assistant) and string content")
        out.append({"role": role, "content": content})
    return out


def preference_conversations(record: dict, where: str) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen answer message, rejected answer message) of one record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields, found {type(record).__name__}")
    for side in ("chosen", "rejected"):
        if side not in record:
            raise ValueError(f"{where}: the record has no {side!r} side; a preference pair needs both")
    chosen, rejected = _messages(record["chosen"], where, "chosen"), _messages(record["rejected"], where, "rejected")
    if "prompt" in record:
        prompt = _messages(record["prompt"], where, "prompt") if not isinstance(record["prompt"], str) \
            else [{"role": "user", "content": record["prompt"]}]
        if len(chosen) != 1 or len(rejected) != 1:
            raise ValueError(f"{where}: with a 'prompt', 'chosen' and 'rejected' must each be one assistant answer")
        if isinstance(record.get("system"), str) and record["system"]:
            prompt = [{"role": "system", "content": record["system"]}] + prompt
    else:  # two whole conversations: the prompt is what they share before their last turn
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if prompt != _messages(record["rejected"], where, "rejected")[:-1]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' differ before their last turn; they must answer "
                             "the same prompt")
    for side, answer in (("chosen", chosen[0]), ("rejected", rejected[0])):
        if answer["role"] != "assistant":
            raise ValueError(f"{where}: the {side} side must end with an assistant answer")
        check_conversation(prompt + [answer], where, side)
    return prompt, chosen[0], rejected[0]


def encode_pair(record: dict, template: ChatTemplate, where: str) -> PreferencePair:
    prompt, chosen, rejected = preference_conversations(record, where)
    a, b = template.encode(prompt + [chosen], where), template.encode(prompt + [rejected], where)
    shared = len(template.prompt_tokens(prompt, where))
    # Only the final answers are compared: earlier assistant turns belong to the prompt.
    for mask in (a.loss_mask, b.loss_mask):
        mask[:shared] = 0
    return PreferencePair(a.tokens, a.loss_mask, b.tokens, b.loss_mask, shared)


def read_preference_pairs(path: str | Path, template: ChatTemplate, *, max_tokens: int | None = None
                          ) -> tuple[list[PreferencePair], int]:
    """Every pair of a JSON-lines file, and how many were dropped for a side longer than `max_tokens`."""
    pairs, dropped = [], 0
    for where, record in json_lines(path, "preference data"):
        pair = encode_pair(record, template, where)
        if max_tokens is not None and max(len(pair.chosen), len(pair.rejected)) > max_tokens:
            dropped += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path} holds no usable preference pair")
    return pairs, dropped
