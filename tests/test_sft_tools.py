"""The built-in instruction set (tools/builtin_sft.py), chat-template prompts for generation, and
exact-match evaluation (tools/sft_eval.py) against answers computed here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron.core.datasets.chat_template import DefaultChatTemplate, JinjaChatTemplate
from megatron.core.inference import SamplingParams, generate
from megatron.core.parallel_state import ParallelState
from megatron.core.tokenizers.tokenizer import NullTokenizer
from megatron.training.cli import run_cli
from megatron.training.inference_model import load_gpt_for_inference
from test_inference_model import GPT2, save_random_checkpoint
from tools import builtin_sft, sft_eval

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]


def test_builtin_questions_have_checkable_answers_and_held_out_names():
    names = builtin_sft.stdlib_names()
    assert len(names) > 500 and ("json", "dumps", "function") in names and ("json", "JSONDecoder", "class") in names
    train, test = builtin_sft.records(names)
    assert len(train) + len(test) == 3 * len(names) and 0.05 < len(test) / (3 * len(names)) < 0.15
    test_names = {r["messages"][0]["content"].split("`")[1] for r in test}
    assert not test_names & {r["messages"][0]["content"].split("`")[1] for r in train}
    kinds = {f"{m}.{n}": k for m, n, k in names}
    for record in train[:300] + test:
        question, answer = (m["content"] for m in record["messages"])
        qualified = question.split("`")[1]
        module, name = qualified.rsplit(".", 1)
        assert answer in (module, name, kinds[qualified])
        assert answer == {"Which": module, "What": name, "Is": kinds[qualified]}[question.split()[0]]


def test_prompt_tokens_are_what_training_puts_before_the_answer(write_hf_tokenizer, tmp_path):
    """The prompt a model answers after is the prefix of the training encoding up to the answer's
    first target token, for the default template and for a Jinja one."""
    from megatron.core.tokenizers.tokenizer import HuggingFaceTokenizer

    path, _ = write_hf_tokenizer(tmp_path)
    tokenizer = HuggingFaceTokenizer(path)
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for template in (DefaultChatTemplate(tokenizer), JinjaChatTemplate(chatml, tokenizer, origin="test")):
        answer = {"role": "assistant", "content": "6"}
        encoded = template.encode(CONVERSATION + [answer])
        prompt = template.prompt_tokens(CONVERSATION)
        last_target_start = max(i for i in range(1, len(encoded.loss_mask))
                                if encoded.loss_mask[i] and not encoded.loss_mask[i - 1])
        assert np.array_equal(prompt, encoded.tokens[:last_target_start]), template.description


def test_exact_match_and_response_loss(tmp_path, capsys):
    """Half the references are the model's own greedy answers, half are not: the tool scores
    exactly those, and its response loss is the mean cross-entropy of the answer tokens."""
    torch.manual_seed(0)
    ps = ParallelState.single("cpu")
    save_random_checkpoint(tmp_path / "ckpt", ps, GPT2)
    model = load_gpt_for_inference(str(tmp_path / "ckpt"), ps).model
    template = DefaultChatTemplate(NullTokenizer(95))
    questions = ["5 17 3", "7 8", "11 12 13 14", "60 61", "1 2 3 4 5 6", "42"]
    turns = [[{"role": "user", "content": q}] for q in questions]
    prompts = [[int(t) for t in template.prompt_tokens(t)] for t in turns]
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=3, greedy=True, stop_on_eod=False),
                      vocab_size=96)
    references = [" ".join(map(str, r.tokens)) if i % 2 == 0 else "1 1 1" for i, r in enumerate(greedy)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in zip(questions, references)))
    # EXTRA_TOKENS past the reference's length could let the model go on; a match needs EOD right after,
    # so compare against the tool's own rule: stripped text equality.
    assert run_cli(lambda: sft_eval.main(["--load", str(tmp_path / "ckpt"), "--input", str(data), "--device", "cpu",
                                          "--out", str(tmp_path / "eval.json")])) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    budget = 3 + sft_eval.EXTRA_TOKENS
    full = generate(model, prompts, SamplingParams(max_new_tokens=budget, greedy=True), vocab_size=96, eod_id=95)
    want = [" ".join(str(t) for t in r.tokens if t != 95) == ref for r, ref in zip(full, references)]
    assert [r["match"] for r in summary["results"]] == want
    assert summary["exact_match"] == sum(want)
    total, count = 0.0, 0
    for q, a in zip(questions, references):
        encoded = template.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        tokens = torch.as_tensor(encoded.tokens)[None]
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(model(tokens[:, :-1])[0].double(), tokens[0, 1:], reduction="none")
        total += float((losses * torch.as_tensor(encoded.loss_mask[1:])).sum())
        count += int(encoded.loss_mask[1:].sum())
    assert summary["response_loss"] == pytest.approx(total / count, rel=1e-6)
    assert "exact match:" in capsys.readouterr().out
    # The same records with the answer under another key (the built-in RLHF prompts' "answer").
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in zip(questions, references)))
    assert run_cli(lambda: sft_eval.main(["--load", str(tmp_path / "ckpt"), "--input", str(renamed), "--device", "cpu",
                                          "--response-key", "answer", "--out", str(tmp_path / "renamed.json")])) == 0
    assert json.loads((tmp_path / "renamed.json").read_text())["results"] == summary["results"]
    # Sampled answers: answer k of question q draws from stream q x N + k of the seed.
    assert run_cli(lambda: sft_eval.main(["--load", str(tmp_path / "ckpt"), "--input", str(data), "--device", "cpu",
                                          "--samples-per-prompt", "3", "--temperature", "1.5", "--seed", "9",
                                          "--out", str(tmp_path / "sampled.json")])) == 0
    sampled = json.loads((tmp_path / "sampled.json").read_text())
    repeated = [p for p in prompts for _ in range(3)]
    drawn = generate(model, repeated, SamplingParams(max_new_tokens=budget, temperature=1.5, seed=9), vocab_size=96,
                     eod_id=95, indices=list(range(len(repeated))))
    want = [" ".join(str(t) for t in r.tokens if t != 95) == references[i // 3] for i, r in enumerate(drawn)]
    assert [r["match"] for r in sampled["results"]] == want and sampled["samples"] == 18
    assert sampled["exact_match_rate"] == pytest.approx(sum(want) / 18)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "1"}]}) + "\n")
    assert run_cli(lambda: sft_eval.main(["--load", str(tmp_path / "ckpt"), "--input", str(bad), "--device", "cpu"])) == 2
