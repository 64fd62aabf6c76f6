"""Preference pairs (rlhf.data): both published layouts, shared prompt tokens, answer-only masks,
one-line errors naming the record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron.core.datasets.chat_template import DefaultChatTemplate
from megatron.core.tokenizers.tokenizer import HuggingFaceTokenizer
from rlhf.data import encode_pair, preference_conversations, read_preference_pairs

FLAT = {"prompt": "Name a fox.", "chosen": "The quick brown fox.", "rejected": "A dog.", "system": "Be brief."}
HH = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Name a fox."}, {"role": "assistant", "content": "The quick brown fox."}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Name a fox."}, {"role": "assistant", "content": "A dog."}]}
TRL = {"prompt": [{"role": "user", "content": "Name a fox."}],
       "chosen": [{"role": "assistant", "content": "The quick brown fox."}], "rejected": "A dog."}


def test_layouts_give_the_same_prompt_and_answers():
    prompt, chosen, rejected = preference_conversations(FLAT, "x")
    assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}]
    assert (chosen["content"], rejected["content"]) == ("The quick brown fox.", "A dog.")
    prompt, chosen, rejected = preference_conversations(HH, "x")
    assert len(prompt) == 3 and prompt[-1]["content"] == "Name a fox." and rejected["content"] == "A dog."
    prompt, chosen, rejected = preference_conversations(TRL, "x")
    assert prompt == [{"role": "user", "content": "Name a fox."}] and chosen["content"] == "The quick brown fox."


def test_pairs_share_the_prompt_and_mask_only_the_answer(write_hf_tokenizer, tmp_path):
    path, _ = write_hf_tokenizer(tmp_path)
    tokenizer = HuggingFaceTokenizer(path)
    template = DefaultChatTemplate(tokenizer)
    for record in (FLAT, HH, TRL):
        pair = encode_pair(record, template, "x")
        n = pair.prompt_tokens
        assert np.array_equal(pair.chosen[:n], pair.rejected[:n])
        for tokens, mask, answer in ((pair.chosen, pair.chosen_mask, "The quick brown fox."),
                                     (pair.rejected, pair.rejected_mask, "A dog.")):
            assert not mask[:n].any() and mask[n:].all()  # the answer and its end of turn, nothing else
            assert tokens[-1] == tokenizer.eod
            assert tokenizer.detokenize(tokens[n:-1].tolist()) == answer


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "c"}, "no 'rejected' side"),
    ({"chosen": HH["chosen"], "rejected": [{"role": "user", "content": "Other"}, HH["rejected"][-1]]},
     "differ before their last turn"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "empty assistant response"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}, "must end with an assistant"),
    ({"prompt": "p", "chosen": ["c", "d"], "rejected": "r"}, "must be a string or a list of messages"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": "r"}, "each be one assistant answer"),
])
def test_bad_records_are_one_line_naming_the_record(record, message, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "1 2", "chosen": "3", "rejected": "4"}) + "\n" + json.dumps(record) + "\n")
    template = DefaultChatTemplate(_null_tokenizer())
    with pytest.raises(ValueError, match=message) as info:
        read_preference_pairs(path, template)
    assert str(info.value).startswith(f"{path}:2: ") and "\n" not in str(info.value)


def test_reading_a_file_and_dropping_long_pairs(tmp_path):
    template = DefaultChatTemplate(_null_tokenizer())
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "1 2 3", "chosen": "4 5", "rejected": "6"}, {"prompt": "1", "chosen": " ".join(["7"] * 30),
                                                                      "rejected": "8"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    pairs, dropped = read_preference_pairs(path, template, max_tokens=10)
    assert len(pairs) == 1 and dropped == 1
    assert pairs[0].chosen.tolist() == [1, 2, 3, 4, 5, 95] and pairs[0].rejected.tolist() == [1, 2, 3, 6, 95]
    with pytest.raises(ValueError, match="does not exist"):
        read_preference_pairs(tmp_path / "missing.jsonl", template)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not JSON"):
        read_preference_pairs(tmp_path / "bad.jsonl", template)


def _null_tokenizer():
    from megatron.core.tokenizers.tokenizer import NullTokenizer
    return NullTokenizer(95)
