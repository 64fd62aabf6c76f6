"""SFT data: record formats, chat templates (against transformers), the loss mask, tools/preprocess_sft.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from megatron.core.datasets.chat_template import DefaultChatTemplate, JinjaChatTemplate, load_chat_template
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.sft_formats import FieldNames, detect_format, to_conversation
from megatron.core.datasets.sft_dataset import sft_dataset_prefixes
from megatron.core.datasets.sft_preprocessing import SFTPreprocessConfig, preprocess_sft
from megatron.core.tokenizers.tokenizer import HuggingFaceTokenizer, NullTokenizer, SentencePieceTokenizer, TokenizerConfig
from tools import run_cli
from tools.preprocess_sft import main as preprocess_sft_main

# ChatML with transformers' {% generation %} markers around what the model must write, so that
# transformers' own assistant mask is an independent reference for ours.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3-like, laid out on several lines: the output depends on trim_blocks / lstrip_blocks.
LLAMA3 = """{{- bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}
        {{ raise_exception('a system message must come first') }}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{% endif %}
"""
CHATML_TOKENS = ("<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "def tokenize(text)?"},
    {"role": "assistant", "content": "return text.split()"},
    {"role": "user", "content": "The quick brown fox?"},
    {"role": "assistant", "content": "  jumps over the lazy dog.\n"},
    {"role": "user", "content": "naïve 世界?"},
    {"role": "assistant", "content": "fox 🚀"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory, write_hf_tokenizer):
    folder = tmp_path_factory.mktemp("chatml")
    write_hf_tokenizer(folder, special_tokens=CHATML_TOKENS)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<pad>", "chat_template": CHATML}))
    return folder


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory, write_hf_tokenizer):
    folder = tmp_path_factory.mktemp("llama3")
    write_hf_tokenizer(folder, special_tokens=LLAMA3_TOKENS)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": "{{ 'this template is overridden by chat_template.jinja' }}"}))
    (folder / "chat_template.jinja").write_text(LLAMA3)
    return folder


def _runs(tokens, mask):
    """Maximal runs of equal mask value: [(mask value, token ids)]."""
    runs = []
    for token, flag in zip(np.asarray(tokens).tolist(), np.asarray(mask).tolist()):
        if runs and runs[-1][0] == flag:
            runs[-1][1].append(token)
        else:
            runs.append((flag, [token]))
    return runs


# ------------------------------------------------------------------------------------ formats

def test_each_format_parses_to_its_conversation():
    fields = FieldNames()
    cases = [
        ({"prompt": "p", "response": "r", "system": "s"}, "prompt-response",
         [("system", "s"), ("user", "p"), ("assistant", "r")]),
        ({"instruction": "Sum.", "input": "1 2", "output": "3"}, "alpaca", [("user", "Sum.\n\n1 2"), ("assistant", "3")]),
        ({"instruction": "Hi.", "input": "", "output": "Hello"}, "alpaca", [("user", "Hi."), ("assistant", "Hello")]),
        ({"instruction": "Hi.", "output": "Hello", "system": None}, "alpaca", [("user", "Hi."), ("assistant", "Hello")]),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                       {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                       {"role": "assistant", "content": "a2"}]}, "chat",
         [("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")]),
        ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                            {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                            {"from": "assistant", "value": "a2"}], "id": 7}, "sharegpt",
         [("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")]),
        # A trailing user turn is context only; the conversation keeps it.
        ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                       {"role": "user", "content": "thanks"}]}, "chat",
         [("user", "u"), ("assistant", "a"), ("user", "thanks")]),
    ]
    for record, fmt, expected in cases:
        assert detect_format(record, fields, "f:1") == fmt
        assert to_conversation(record, fmt, fields, "f:1") == [{"role": r, "content": c} for r, c in expected]


def test_field_names_are_configurable():
    fields = FieldNames(prompt="question", response="answer", system="sys", instruction="task", output="out",
                        input="ctx")
    assert detect_format({"question": "q", "answer": "a"}, fields, "f:1") == "prompt-response"
    assert to_conversation({"question": "q", "answer": "a", "sys": "be nice"}, "prompt-response", fields, "f:1") == [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_conversation({"task": "t", "ctx": "c", "out": "o"}, "alpaca", fields, "f:1")[0]["content"] == "t\n\nc"
    # One --messages-key serves both list layouts; the first message's fields tell which.
    fields = FieldNames(messages="dialog")
    chat = {"dialog": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    sharegpt = {"dialog": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}
    assert (detect_format(chat, fields, "f:1"), detect_format(sharegpt, fields, "f:1")) == ("chat", "sharegpt")
    assert to_conversation(sharegpt, "sharegpt", fields, "f:1") == to_conversation(chat, "chat", fields, "f:1")
    fields = FieldNames(messages="turns", role="speaker", content="text")
    record = {"turns": [{"speaker": "user", "text": "u"}, {"speaker": "assistant", "text": "a"}]}
    assert to_conversation(record, detect_format(record, fields, "f:1"), fields, "f:1")[1] == {
        "role": "assistant", "content": "a"}


@pytest.mark.parametrize("record, fmt, message", [
    ({"prompt": "p"}, "prompt-response", r"^f\.jsonl:4: no field 'response' \(fields: prompt\); pass --response-key"),
    ({"prompt": "p", "response": "  \n"}, "prompt-response", r"^f\.jsonl:4: 'response' is an empty response"),
    ({"instruction": "i", "output": ""}, "alpaca", r"^f\.jsonl:4: 'output' is an empty response"),
    ({"prompt": 3, "response": "r"}, "prompt-response", r"^f\.jsonl:4: 'prompt' is int, expected a string"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "chat",
     r"^f\.jsonl:4: messages\[0\] has role 'assistant' where 'user' must come"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "u"}]}, "chat",
     r"^f\.jsonl:4: messages\[1\] has role 'user' where 'assistant' must come"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "s"}]}, "chat", r"messages\[2\] has role 'system' where 'user'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}, "chat",
     r"^f\.jsonl:4: no assistant turn"),
    ({"messages": []}, "chat", r"^f\.jsonl:4: messages is empty"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}, "chat",
     r"messages\[1\] is an empty assistant response"),
    ({"messages": [{"role": "user", "content": ["u"]}, {"role": "assistant", "content": "a"}]}, "chat",
     r"messages\[0\]\.content is list, expected a string"),
    ({"messages": [{"role": "tool", "content": "u"}]}, "chat", r"messages\[0\] has role 'tool'"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", r"conversations\[0\] has no 'value' \(fields: from\)"),
    ({"messages": "hi"}, "chat", r"'messages' is str, expected a list of messages"),
    ({"system": "s", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                  {"role": "assistant", "content": "a"}]}, "chat", r"both a 'system' field and"),
])
def test_bad_records_raise_one_line_naming_the_record(record, fmt, message):
    with pytest.raises(ValueError, match=message) as caught:
        to_conversation(record, fmt, FieldNames(), "f.jsonl:4")
    assert "\n" not in str(caught.value)


def test_unknown_layout_is_named():
    with pytest.raises(ValueError, match=r"^f:2: cannot tell the SFT format from the fields \(question, text\)"):
        detect_format({"text": "t", "question": "q"}, FieldNames(), "f:2")


# ------------------------------------------------------------------------------------ templates

@pytest.mark.parametrize("folder_fixture", ["chatml_folder", "llama3_folder"])
def test_jinja_template_renders_and_tokenizes_as_transformers(folder_fixture, request):
    from transformers import AutoTokenizer

    folder = request.getfixturevalue(folder_fixture)
    reference = AutoTokenizer.from_pretrained(str(folder))
    tokenizer = HuggingFaceTokenizer(folder)
    template = load_chat_template(tokenizer)
    assert isinstance(template, JinjaChatTemplate)
    for count in (3, 5, len(CONVERSATION)):
        messages = CONVERSATION[:count]
        for prompt in (False, True):
            assert template.render(messages, add_generation_prompt=prompt) == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt)
    encoded = template.encode(CONVERSATION, "f:1")
    expected = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=folder_fixture == "chatml_folder")
    assert encoded.tokens.tolist() == expected["input_ids"]
    assert encoded.matches_whole_text
    if folder_fixture == "chatml_folder":  # transformers' mask from the {% generation %} spans
        assert encoded.loss_mask.tolist() == expected["assistant_masks"]


@pytest.mark.parametrize("folder_fixture, end_of_turn, strip", [("chatml_folder", "<|im_end|>", False),
                                                                 ("llama3_folder", "<|eot_id|>", True)])
def test_loss_mask_marks_exactly_every_answer_and_its_end_of_turn(folder_fixture, end_of_turn, strip, request):
    tokenizer = HuggingFaceTokenizer(request.getfixturevalue(folder_fixture))
    template = load_chat_template(tokenizer)
    encoded = template.encode(CONVERSATION, "f:1")
    assert encoded.tokens.dtype == np.int64 and encoded.loss_mask.dtype == np.uint8
    runs = _runs(encoded.tokens, encoded.loss_mask)
    targets = [tokenizer.detokenize(ids) for flag, ids in runs if flag == 1]
    assert targets == [(a.strip() if strip else a) + end_of_turn for a in ANSWERS]
    # The runs in order give back the rendered text: nothing else is a target, nothing is lost.
    assert "".join(tokenizer.detokenize(ids) for _, ids in runs) == template.render(CONVERSATION)
    assert runs[0][0] == 0 and tokenizer.detokenize(runs[-1][1]) == "\n"  # the separator after the last turn


def test_generation_prompt_that_differs_from_the_assistant_header(chatml_folder):
    tokenizer = HuggingFaceTokenizer(chatml_folder)
    # The generation prompt ends with a newline the assistant's own header does not have.
    template = JinjaChatTemplate("{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n"
                                 "{% else %}A: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                                 "{% if add_generation_prompt %}A: \n{% endif %}", tokenizer, origin="t.jinja")
    encoded = template.encode(CONVERSATION[1:5])
    targets = [tokenizer.detokenize(ids) for flag, ids in _runs(encoded.tokens, encoded.loss_mask) if flag]
    assert targets == [ANSWERS[0] + "<|im_end|>", ANSWERS[1] + "<|im_end|>"]


def test_template_pieces_that_merge_differently_are_counted(tmp_path, write_hf_tokenizer):
    write_hf_tokenizer(tmp_path)
    tokenizer = HuggingFaceTokenizer(tmp_path)
    # No boundary between the header " tok" and the answer "enize": the whole text tokenizes " tokenize".
    template = JinjaChatTemplate("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} tok"
                                 "{% else %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
                                 "{% if add_generation_prompt %} tok{% endif %}", tokenizer, origin="t.jinja")
    messages = [{"role": "user", "content": "The"}, {"role": "assistant", "content": "enize"}]
    encoded = template.encode(messages)
    whole = tokenizer.tokenize("The tokenize<|endoftext|>")
    assert encoded.tokens.tolist() != whole and not encoded.matches_whole_text
    # The pieces keep the answer's tokens as the model writes them after the prompt.
    assert encoded.tokens.tolist() == tokenizer.tokenize("The tok") + tokenizer.tokenize("enize<|endoftext|>")
    assert encoded.loss_mask.tolist() == [0] * len(tokenizer.tokenize("The tok")) + [1] * len(
        tokenizer.tokenize("enize<|endoftext|>"))


def test_default_template_with_sentencepiece_huggingface_and_null(builtin_corpus_small, tmp_path, write_hf_tokenizer):
    write_hf_tokenizer(tmp_path)  # a bare tokenizer.json: no chat template, so the default one
    for tokenizer in (SentencePieceTokenizer(builtin_corpus_small.tokenizer_model), HuggingFaceTokenizer(tmp_path)):
        template = load_chat_template(tokenizer)
        assert isinstance(template, DefaultChatTemplate)
        encoded = template.encode(CONVERSATION, "f:1")
        tok, eod = tokenizer.tokenize, tokenizer.eod
        expected = (tok("<|system|>\nYou are terse.\n<|user|>\ndef tokenize(text)?\n<|assistant|>\n")
                    + tok(ANSWERS[0]) + [eod] + tok("<|user|>\nThe quick brown fox?\n<|assistant|>\n")
                    + tok(ANSWERS[1]) + [eod] + tok("<|user|>\nnaïve 世界?\n<|assistant|>\n") + tok(ANSWERS[2]) + [eod])
        assert encoded.tokens.tolist() == expected
        targets = [ids for flag, ids in _runs(encoded.tokens, encoded.loss_mask) if flag == 1]
        assert [ids[-1] for ids in targets] == [eod] * 3
        assert [tokenizer.detokenize(ids[:-1]) for ids in targets] == ANSWERS
        assert int(encoded.loss_mask.sum()) == sum(len(tok(a)) + 1 for a in ANSWERS)
    null = NullTokenizer(100)
    encoded = load_chat_template(null).encode([{"role": "system", "content": "7"}, {"role": "user", "content": "1 2"},
                                               {"role": "assistant", "content": "3 4"}, {"role": "user", "content": "5"},
                                               {"role": "assistant", "content": "6"}])
    assert encoded.tokens.tolist() == [7, 1, 2, 3, 4, 100, 5, 6, 100]
    assert encoded.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match=r"^f:9: NullTokenizer input must be whitespace-separated integers"):
        load_chat_template(null).encode([{"role": "user", "content": "x"}, {"role": "assistant", "content": "1"}], "f:9")


def test_template_errors_are_one_line_value_errors(llama3_folder, tmp_path):
    tokenizer = HuggingFaceTokenizer(llama3_folder)
    template = load_chat_template(tokenizer)
    late_system = [{"role": "user", "content": "u"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match=r"^f\.jsonl:3: chat template .*chat_template\.jinja failed: "
                                         r"TemplateError: a system message must come first$"):
        template.encode(late_system, "f.jsonl:3")
    undefined = tmp_path / "undefined.jinja"
    undefined.write_text("{% for m in messages %}{{ m.metadata.lang }}{% endfor %}")
    with pytest.raises(ValueError, match=r"^f\.jsonl:5: chat template .*undefined\.jinja failed: UndefinedError"):
        load_chat_template(tokenizer, str(undefined)).encode(CONVERSATION, "f.jsonl:5")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ValueError, match=r"^.*broken\.jinja: chat template syntax error at line 2"):
        load_chat_template(tokenizer, str(broken))
    ignores_content = tmp_path / "silent.jinja"
    ignores_content.write_text("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match=r"^f:1: chat template .*silent\.jinja does not render assistant message 2"):
        load_chat_template(tokenizer, str(ignores_content)).encode(CONVERSATION, "f:1")
    with pytest.raises(ValueError, match=r"--chat-template FILE needs --tokenizer-type HuggingFaceTokenizer"):
        load_chat_template(NullTokenizer(10), str(undefined))


# ------------------------------------------------------------------------------------ the tool

def _conversations(count):
    """Distinct multi-turn chats; every fifth has two answers."""
    chats = []
    for i in range(count):
        chat = [{"role": "user", "content": f"The quick fox {i}?"},
                {"role": "assistant", "content": f"def tokenize(text): return {i}"}]
        if i % 5 == 0:
            chat = [{"role": "system", "content": "Be brief."}] + chat + [
                {"role": "user", "content": "and the lazy dog?"}, {"role": "assistant", "content": "jumps " * (i % 3 + 1)}]
        chats.append(chat)
    return chats


def _write_inputs(folder, chats):
    """Four files, one per layout, read in this order by --input 'folder/*'; returns the chats in input order."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    a, b, c, d = chats[:12], chats[12:20], chats[20:26], chats[26:]
    (folder / "a.jsonl").write_text("".join(json.dumps({"messages": m, "id": i}) + "\n" for i, m in enumerate(a)))
    sharegpt = [[{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], "system"), "value": m["content"]}
                 for m in chat] for chat in b]
    pq.write_table(pa.table({"conversations": sharegpt}), folder / "b.parquet", row_group_size=3)
    c = [chat[-2:] for chat in c]  # single turns, as Alpaca and prompt/response hold
    datasets.Dataset.from_dict({"instruction": [m[0]["content"] for m in c], "input": ["", "ctx"] * 3,
                                "output": [m[1]["content"] for m in c]}).save_to_disk(folder / "c_hf")
    c = [[{"role": "user", "content": m[0]["content"] + ("\n\nctx" if i % 2 else "")}, m[1]] for i, m in enumerate(c)]
    d = [chat[-2:] for chat in d]
    (folder / "d.json").write_text(json.dumps([{"prompt": m[0]["content"], "response": m[1]["content"],
                                                "system": "sys" if i == 0 else None} for i, m in enumerate(d)]))
    d = [([{"role": "system", "content": "sys"}] if i == 0 else []) + m for i, m in enumerate(d)]
    return a + b + c + d  # the ShareGPT file holds b's messages under other field names


def _documents(prefix):
    tokens_prefix, mask_prefix = sft_dataset_prefixes(str(prefix))
    tokens, mask = IndexedDataset(tokens_prefix), IndexedDataset(mask_prefix)
    assert mask.dtype is np.uint8 and np.array_equal(tokens.document_lengths, mask.document_lengths)
    return [(tokens[i].tolist(), mask[i].tolist()) for i in range(len(tokens))]


def _flags(folder, *extra):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(folder), *map(str, extra)]


def test_tool_end_to_end_formats_workers_valid_split_and_stats(tmp_path, run_tool, chatml_folder):
    chats = _conversations(30)
    chats[3][1]["content"] = "over the lazy dog " * 30  # too long for --seq-length 128: dropped
    expected_chats = _write_inputs(tmp_path / "in", chats)
    template = load_chat_template(HuggingFaceTokenizer(chatml_folder))
    expected = [template.encode(chat) for chat in expected_chats]
    expected = [(e.tokens.tolist(), e.loss_mask.tolist()) for e in expected]
    assert [i for i, (ids, _) in enumerate(expected) if len(ids) > 129] == [3]
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "sft"
        completed = run_tool("preprocess_sft.py", "--input", tmp_path / "in" / "*", "--output-prefix", prefix,
                             *_flags(chatml_folder, "--seq-length", 128, "--valid-fraction", 0.2, "--seed", 5,
                                     "--workers", workers))
        assert completed.returncode == 0, completed.stderr
        assert "30 samples read, 29 written (train 23, valid 6), 1 dropped (overlong 1" in completed.stdout
        outputs[workers] = {p.name: p.read_bytes() for p in prefix.parent.iterdir()}
    assert outputs[1] == outputs[2]
    assert sorted(outputs[1]) == sorted([f"sft{split}_{kind}_document.{ext}" for split in ("", "-valid")
                                         for kind in ("tokens", "loss_mask") for ext in ("bin", "idx")]
                                        + ["sft_sft_stats.json"])
    valid = np.zeros(30, dtype=bool)
    valid[np.random.default_rng(5).choice(30, size=6, replace=False)] = True
    kept = [i for i in range(30) if i != 3]
    prefix = tmp_path / "w1" / "sft"
    assert _documents(prefix) == [expected[i] for i in kept if not valid[i]]
    assert _documents(f"{prefix}-valid") == [expected[i] for i in kept if valid[i]]
    stats = json.loads((tmp_path / "w1" / "sft_sft_stats.json").read_text())
    train_tokens = sum(len(expected[i][0]) for i in kept if not valid[i])
    assert {k: stats[k] for k in ("samples_read", "samples_written", "samples_dropped", "dropped", "samples_truncated",
                                  "tokens", "assistant_tokens", "samples_pieces_differ_from_whole_text")} == {
        "samples_read": 30, "samples_written": 29, "samples_dropped": 1, "dropped": {"overlong": 1, "no_target": 0},
        "samples_truncated": 0, "tokens": sum(len(expected[i][0]) for i in kept),
        "assistant_tokens": sum(sum(expected[i][1]) for i in kept), "samples_pieces_differ_from_whole_text": 0}
    assert stats["splits"]["train"]["samples"] == 23 and stats["splits"]["train"]["tokens"] == train_tokens
    assert [entry["format"] for entry in stats["inputs"]] == ["chat", "sharegpt", "alpaca", "prompt-response"]


def test_overlong_samples_are_dropped_or_truncated_and_counted(tmp_path, chatml_folder):
    tokenizer = HuggingFaceTokenizer(chatml_folder)
    template = load_chat_template(tokenizer)
    records = [{"prompt": "The quick fox?", "response": "jumps"},  # short
               {"prompt": "The quick fox?", "response": "over the lazy dog " * 10},  # long answer: cut inside it
               {"prompt": "def tokenize(text) " * 20, "response": "fox"}]  # long prompt: no answer left
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    encoded = [template.encode(to_conversation(r, "prompt-response", FieldNames(), "")) for r in records]
    seq_length = 40
    assert len(encoded[0].tokens) <= seq_length + 1 < min(len(encoded[1].tokens), len(encoded[2].tokens))
    assert not encoded[2].loss_mask[:seq_length + 1].any()
    config = dict(input=str(source), tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer",
                                                               tokenizer_model=str(chatml_folder)), seq_length=seq_length)
    dropped = preprocess_sft(SFTPreprocessConfig(output_prefix=str(tmp_path / "drop"), **config)).stats
    assert (dropped["samples_written"], dropped["dropped"], dropped["samples_truncated"]) == (
        1, {"overlong": 2, "no_target": 0}, 0)
    assert _documents(tmp_path / "drop") == [(encoded[0].tokens.tolist(), encoded[0].loss_mask.tolist())]
    cut = preprocess_sft(SFTPreprocessConfig(output_prefix=str(tmp_path / "cut"), overlong="truncate", **config)).stats
    assert (cut["samples_written"], cut["samples_dropped"], cut["dropped"], cut["samples_truncated"]) == (
        2, 1, {"overlong": 0, "no_target": 1}, 2)
    assert _documents(tmp_path / "cut")[1] == (encoded[1].tokens[:41].tolist(), encoded[1].loss_mask[:41].tolist())


def _bad_inputs(folder, chatml_folder):
    """(name, flags, expected stderr) for each kind of bad input."""
    folder.mkdir()

    def jsonl(name, *records):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return folder / name

    good = {"prompt": "p", "response": "r"}
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    (folder / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    no_system = folder / "no_system.jinja"
    no_system.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    flags = _flags(chatml_folder, "--seq-length", 64)
    return [
        ("missing field", ["--input", jsonl("missing.jsonl", good, {"prompt": "p"}), *flags],
         r"missing\.jsonl:2: no field 'response' \(fields: prompt\)"),
        ("empty response", ["--input", jsonl("empty.jsonl", good, good, {"prompt": "p", "response": ""}), *flags,
                            "--workers", "2"], r"empty\.jsonl:3: 'response' is an empty response"),
        ("roles out of order", ["--input", jsonl("order.jsonl", chat, {"messages": chat["messages"][::-1]}), *flags],
         r"order\.jsonl:2: messages\[0\] has role 'assistant' where 'user' must come"),
        ("no assistant turn", ["--input", jsonl("no_answer.jsonl", {"messages": chat["messages"][:1]}), *flags],
         r"no_answer\.jsonl:1: no assistant turn"),
        ("template error", ["--input", jsonl("system.jsonl", good, dict(good, system="s")), *flags,
                            "--chat-template", no_system],
         r"system\.jsonl:2: chat template .*no_system\.jinja failed: TemplateError: System role not supported"),
        ("unreadable file", ["--input", folder / "corrupt.parquet", *flags], r"corrupt\.parquet: not a readable Parquet"),
        ("unknown layout", ["--input", jsonl("layout.jsonl", {"text": "t"}), *flags],
         r"layout\.jsonl:1: cannot tell the SFT format"),
        ("valid split too large", ["--input", jsonl("two.jsonl", good, good), *flags, "--valid-fraction", "0.9"],
         r"--valid-fraction 0\.9 of 2 records leaves no training sample"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, run_tool, chatml_folder):
    out = tmp_path / "out"
    out.mkdir()
    source = tmp_path / "earlier.jsonl"
    source.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    # An earlier output under the same prefix must survive every failed run untouched.
    assert run_cli(preprocess_sft_main, ["--input", str(source), "--output-prefix", str(out / "sft"),
                                         *_flags(chatml_folder, "--seq-length", 64)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 5
    cases = _bad_inputs(tmp_path / "bad", chatml_folder)
    for name, flags, message in cases:
        capsys.readouterr()
        assert run_cli(preprocess_sft_main, ["--output-prefix", str(out / "sft"), *map(str, flags)]) == 2, name
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and re.search(message, stderr), (name, stderr)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, name
    # The real command line: the same contract, no traceback.
    completed = run_tool("preprocess_sft.py", "--output-prefix", out / "sft", *cases[0][1])
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1, completed.stderr
    assert "Traceback" not in completed.stderr and re.search(cases[0][2], completed.stderr)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
