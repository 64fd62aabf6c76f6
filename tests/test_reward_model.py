"""The reward model (rlhf/models.py, rlhf/train_reward_model.py): the scalar head is a linear map of
the GPT's final hidden states, a GPT checkpoint gives the backbone bit for bit (not the LM head),
training gives the same losses at TP1, TP2 (with and without sequence parallelism) and DP2, learns an
easily separable preference set, trains at O3 as at none, resumes exactly, a saved reward model
loads frozen for inference, and bad input ends with one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rlhf_records
from distributed import run_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.core.tokenizers.tokenizer import TokenizerConfig
from megatron.core.transformer.config import TransformerConfig
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.gpt_providers import gpt_task, transformer_config
from megatron.training.inference_model import load_gpt_for_inference
from megatron.training.training import Trainer
from rlhf import train_reward_model
from rlhf.common import chat_template_for
from rlhf.data import read_preference_pairs
from rlhf.models import (
    ScalarHeadGPT, load_reward_model_for_inference, parallelize_scalar_head_gpt, reward_model_provider,
    sequence_rewards,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB, SEQ = 60, 16
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
         "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--tokenizer-type", "NullTokenizer",
         "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "16", "--device", "cpu",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--num-workers", "0", "--normalization", "RMSNorm",
         "--swiglu", "--position-embedding-type", "rope"]
TRAIN = MODEL + ["--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "0",
                 "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only contends with the other processes on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- data ---------------------------------------------------------------------------------------
def write_preferences(path: Path, count: int, seed: int, chat: bool = False) -> Path:
    """Prompts of ids 1..29; the chosen answer is the prompt's "right word" (30..49, a rule of the
    prompt), the rejected one a wrong word (50..59): easy to separate, and a fresh model is right
    about half the time. `chat`: records as two whole conversations (Anthropic HH's layout)."""
    rng = np.random.RandomState(seed)
    with open(path, "w") as out:
        for _ in range(count):
            prompt = " ".join(map(str, rng.randint(1, 30, size=rng.randint(2, 7))))
            right, wrong = str(sum(map(int, prompt.split())) % 20 + 30), str(rng.randint(50, VOCAB))
            record = {"prompt": prompt, "chosen": right, "rejected": wrong}
            if chat:
                record = {side: [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                          for side, answer in (("chosen", right), ("rejected", wrong))}
            out.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prefs")
    write_preferences(root / "train.jsonl", 96, seed=1)
    write_preferences(root / "valid.jsonl", 24, seed=2, chat=True)
    return root


metrics = rlhf_records  # the records with their "rlhf" values at the top


def losses(path) -> list[float]:
    return [r["loss"] for r in metrics(path)]


def run_rm(argv) -> int:
    return run_cli(lambda: train_reward_model.main([str(a) for a in argv]))


def rm_args(prefs: Path, iters: int, *extra) -> list[str]:
    return TRAIN + ["--data-path", str(prefs / "train.jsonl"), "--train-iters", str(iters), *map(str, extra)]


# ----- the model ----------------------------------------------------------------------------------
def tiny_config(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                                       max_position_embeddings=SEQ, ffn_hidden_size=64, hidden_dropout=0.0,
                                       attention_dropout=0.0, normalization="RMSNorm", swiglu=True,
                                       position_embedding_type="rope"), **overrides})


def final_hidden(model, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(model output, the decoder's output: the final hidden states after the last norm)."""
    seen = []
    handle = model.decoder.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        out = model(tokens)
    handle.remove()
    return out, seen[0]


def test_the_head_is_a_linear_map_of_the_final_hidden_states():
    ps = ParallelState.single("cpu")
    model = ScalarHeadGPT(tiny_config(), device="meta")
    parallelize_scalar_head_gpt(model, ps)
    initialize_parameters(model, ps, seed=7)
    with torch.no_grad():
        model.output_layer.bias.fill_(0.25)
    model.eval()
    assert [n for n, _ in model.named_parameters() if n.startswith("output_layer")] == \
        ["output_layer.weight", "output_layer.bias"]
    assert model.output_layer.weight.shape == (1, 32)
    assert model.output_layer.weight.data_ptr() != model.embedding.word_embeddings.weight.data_ptr()
    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    values, hidden = final_hidden(model, tokens)
    assert values.shape == (3, SEQ)
    head = model.output_layer
    want = (hidden.double() @ head.weight.double().t() + head.bias.double()).squeeze(-1).t()
    torch.testing.assert_close(values.double(), want, rtol=1e-6, atol=1e-6)
    last = torch.tensor([SEQ - 1, 4, 0])
    assert torch.equal(sequence_rewards(values, last), values[torch.arange(3), last])
    # Causal: the reward at a position does not see the padding after it.
    padded = tokens.clone()
    padded[1, 5:] = 0
    torch.testing.assert_close(sequence_rewards(final_hidden(model, padded)[0], last)[1], values[1, 4])
    with pytest.raises(TypeError, match="no labels"):
        model(tokens, tokens)


def _config(argv):
    return parse_config(argv).for_world(1)


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory) -> Path:
    """A GPT (untied LM head) trained 2 iterations and saved, as pretraining leaves one."""
    root = tmp_path_factory.mktemp("gpt")

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            self.ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"tokens": self.ids[i, :-1], "labels": self.ids[i, 1:], "loss_mask": torch.ones(SEQ),
                    "position_ids": torch.arange(SEQ)}

    config = _config(TRAIN + ["--untie-embeddings-and-output-weights", "--train-iters", "2", "--save", str(root),
                              "--data-path", "unused"])
    ps = ParallelState.single("cpu")
    task = replace(gpt_task(config, ps, VOCAB + 1, eod_id=None),
                   datasets_provider=lambda config, num_samples: (Tokens(num_samples[0]), None, None))
    trainer = Trainer(config, ps, task)
    trainer.train()
    trainer.close()
    return root


def test_a_gpt_checkpoint_gives_the_backbone_bit_for_bit_and_not_its_lm_head(gpt_checkpoint):
    ps = ParallelState.single("cpu")
    config = _config(TRAIN + ["--train-iters", "1"])
    transformer = transformer_config(config, 64)
    fresh = reward_model_provider(config, ps, model_parallel_seed(ps, 1), transformer=transformer)
    model = reward_model_provider(config, ps, model_parallel_seed(ps, 1), transformer=transformer,
                                  init_from=str(gpt_checkpoint))
    gpt = load_gpt_for_inference(str(gpt_checkpoint), ps).model
    gpt_params = dict(gpt.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert set(names) - set(gpt_params) == {"output_layer.bias"}
    for name, param in model.named_parameters():
        if name.startswith("output_layer."):  # the scalar head keeps its own init
            assert torch.equal(param, dict(fresh.named_parameters())[name]), name
        else:
            assert torch.equal(param, gpt_params[name]), name
    assert gpt_params["output_layer.weight"].shape == (64, 32)
    # The same final hidden states as the GPT's.
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    _, want = final_hidden(gpt, tokens)
    _, got = final_hidden(model.eval(), tokens)
    assert torch.equal(got, want)
    # A vocabulary padded otherwise (another tensor-parallel size): the real rows are the GPT's.
    wider = reward_model_provider(config, ps, model_parallel_seed(ps, 1),
                                  transformer=replace(transformer, vocab_size=96), init_from=str(gpt_checkpoint))
    rows = wider.embedding.word_embeddings.weight
    assert rows.shape == (96, 32) and torch.equal(rows[:64], gpt_params["embedding.word_embeddings.weight"])
    # Another backbone: one line naming the flag.
    other = transformer_config(_config(TRAIN + ["--train-iters", "1", "--num-layers", "3"]), 64)
    with pytest.raises(ValueError, match="has --num-layers 2, this run 3") as info:
        reward_model_provider(config, ps, model_parallel_seed(ps, 1), transformer=other,
                              init_from=str(gpt_checkpoint))
    assert "\n" not in str(info.value)


# ----- training -----------------------------------------------------------------------------------
def layouts_worker(rank, world_size, runs):
    """Several runs in one start: the process group stays up between them (run_cli would end it)."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    return [train_reward_model.main([str(a) for a in argv]) for argv in runs]


def test_tp2_sp_and_dp2_train_as_tp1(prefs, tmp_path):
    """The same losses (and correct pairs) at TP2, TP2 with sequence parallelism and DP2 as at TP1;
    at O3 (FP8 casts scaled per shard, FP8 ZeRO over the data-parallel ranks) within 1%."""
    o3 = ["--fp8-level", "O3", "--fp8-min-features", "16", "--fp8-recipe", "current"]
    base = rm_args(prefs, 5, "--lr", "1e-3")
    for name, extra in (("tp1", []), ("tp1-o3", o3)):
        assert run_rm(base + extra + ["--metrics-file", tmp_path / f"{name}.jsonl"]) == 0
    tp2 = ["--tensor-model-parallel-size", "2"]
    layouts = {"tp2": tp2, "tp2-sp": tp2 + ["--sequence-parallel"], "dp2": [],
               "tp2-sp-o3": tp2 + ["--sequence-parallel"] + o3, "dp2-o3": o3}
    runs = [base + layout + ["--metrics-file", tmp_path / f"{name}.jsonl"] for name, layout in layouts.items()]
    assert run_distributed(layouts_worker, 2, runs, timeout=180) == [[0] * len(runs)] * 2
    for name in layouts:
        fp8 = name.endswith("o3")
        want = losses(tmp_path / ("tp1-o3.jsonl" if fp8 else "tp1.jsonl"))
        assert losses(tmp_path / f"{name}.jsonl") == pytest.approx(want, rel=1e-2 if fp8 else 1e-5), name
        if not fp8:
            assert [r["correct_pairs"] for r in metrics(tmp_path / f"{name}.jsonl")] == \
                [r["correct_pairs"] for r in metrics(tmp_path / "tp1.jsonl")], name


def test_training_separates_the_preferences_and_o3_trains_as_none(prefs, tmp_path):
    """Training accuracy (correct_pairs of each global batch) rises and the loss falls; the final
    validation pass is right about the held-out pairs; O3's losses stay within a few percent of
    none's (the mean over the run, and over its last iterations)."""
    runs = {}
    for level in ("none", "O3"):
        out = tmp_path / f"{level}.jsonl"
        args = rm_args(prefs, 20, "--lr", "1e-3", "--global-batch-size", "16", "--micro-batch-size", "8",
                       "--valid-data-path", prefs / "valid.jsonl", "--eval-out", tmp_path / f"{level}.json",
                       "--metrics-file", out, "--fp8-level", level, "--fp8-min-features", "32",
                       "--fp8-recipe", "current")
        assert run_rm(args) == 0
        records = metrics(out)
        correct = [r["correct_pairs"] for r in records]
        loss = [r["loss"] for r in records]
        assert sum(correct[-4:]) > sum(correct[:4]) and sum(correct[-4:]) >= 0.9 * 64, (level, correct)
        assert sum(loss[-4:]) / 4 < loss[0] - 0.25, (level, loss)
        evaluation = json.loads((tmp_path / f"{level}.json").read_text())
        assert evaluation["pairs"] == 24 and evaluation["iteration"] == 20
        assert evaluation["accuracy"] >= 0.9, evaluation
        runs[level] = loss
    mean = {level: sum(loss) / len(loss) for level, loss in runs.items()}
    last = {level: sum(loss[-6:]) / 6 for level, loss in runs.items()}
    assert mean["O3"] == pytest.approx(mean["none"], rel=0.03), mean
    assert last["O3"] == pytest.approx(last["none"], rel=0.05), last


def test_resume_is_exact_and_the_saved_model_loads_for_inference(prefs, tmp_path, capsys):
    straight, split, ckpt = tmp_path / "straight.jsonl", tmp_path / "split.jsonl", tmp_path / "ckpt"
    valid = ["--valid-data-path", prefs / "valid.jsonl", "--eval-interval", "2", "--eval-iters", "1"]
    assert run_rm(rm_args(prefs, 4, *valid, "--metrics-file", straight)) == 0
    base = rm_args(prefs, 4, *valid, "--save", ckpt, "--metrics-file", split, "--eval-out", tmp_path / "eval.json")
    assert run_rm(base + ["--exit-interval", "2"]) == 0
    assert run_rm(base + ["--load", ckpt]) == 0
    assert [r["iteration"] for r in metrics(split)] == [1, 2, 3, 4]
    assert losses(split) == losses(straight)
    assert [r.get("val_loss") for r in metrics(split)] == [r.get("val_loss") for r in metrics(straight)]
    # The saved reward model, frozen, gives the validation numbers the run printed.
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    ps = ParallelState.single("cpu")
    loaded = load_reward_model_for_inference(ckpt, ps)
    assert isinstance(loaded.model, ScalarHeadGPT) and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    template = chat_template_for(TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB), "default")
    pairs, _ = read_preference_pairs(prefs / "valid.jsonl", template, max_tokens=SEQ)
    kw = dict(seq_length=SEQ, micro_batch_size=4, pad_id=VOCAB)
    got = train_reward_model.preference_accuracy(loaded.model, pairs, ps, **kw)
    assert got["accuracy"] == evaluation["accuracy"]
    assert got["loss"] == pytest.approx(evaluation["loss"], rel=1e-6)
    # A reward model's checkpoint as the starting point gives the head too.
    config = _config(TRAIN + ["--train-iters", "1"])
    again = reward_model_provider(config, ps, model_parallel_seed(ps, 1), transformer=transformer_config(config, 64),
                                  init_from=str(ckpt))
    for name, param in loaded.model.named_parameters():
        assert torch.equal(dict(again.named_parameters())[name], param), name
    o3 = load_reward_model_for_inference(ckpt, ps, fp8_level="O3")
    assert train_reward_model.preference_accuracy(o3.model, pairs, ps, **kw)["loss"] == \
        pytest.approx(evaluation["loss"], rel=0.05)


# ----- bad input ----------------------------------------------------------------------------------
def run_script(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "rlhf" / "train_reward_model.py"), *map(str, argv)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_training_starts_from_an_sft_model(prefs, gpt_checkpoint, tmp_path, capsys):
    """--pretrained-checkpoint: iteration 1's loss is that of the first global batch under the
    GPT's backbone and the head's own init (computed here with the provider's model)."""
    out = tmp_path / "m.jsonl"
    assert run_rm(rm_args(prefs, 1, "--pretrained-checkpoint", gpt_checkpoint, "--metrics-file", out)) == 0
    assert f"from {gpt_checkpoint}" in capsys.readouterr().out
    config = _config(rm_args(prefs, 1))
    ps = ParallelState.single("cpu")
    model = reward_model_provider(config, ps, model_parallel_seed(ps, 1), transformer=transformer_config(config, 64),
                                  init_from=str(gpt_checkpoint))
    template = chat_template_for(TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB), "auto")
    pairs, _ = read_preference_pairs(prefs / "train.jsonl", template, max_tokens=SEQ)
    train, _, _ = train_reward_model.reward_datasets_provider(config, (8, 0, 0), train_pairs=pairs, valid_pairs=[],
                                                              pad_id=VOCAB)
    want = []
    with torch.no_grad():
        for start in range(0, 8, 2):
            batch = {k: torch.stack([train[start][k], train[start + 1][k]]) for k in train[0]}
            output, loss_fn = train_reward_model.reward_forward_step(iter([batch]), model, ps.device)
            want.append(loss_fn(output)[0].item())
    assert losses(out)[0] == pytest.approx(sum(want) / 4, rel=1e-5)


def test_bad_input_is_one_line_and_exit_code_2(prefs, gpt_checkpoint, tmp_path, capsys):
    completed = run_script(*rm_args(prefs, 1, "--pipeline-model-parallel-size", "2"))
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip().count("\n") == 0 and "pipeline" in completed.stderr
    assert completed.stderr.startswith("error: ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 2", "chosen": "3", "rejected": "4"}) + "\n"
                   + json.dumps({"prompt": "1 2", "chosen": "3"}) + "\n")
    cases = {
        "no 'rejected' side": TRAIN + ["--data-path", bad, "--train-iters", "1"],
        "does not exist": rm_args(prefs, 1, "--pretrained-checkpoint", tmp_path / "missing"),
        "holds a GPT checkpoint": rm_args(prefs, 1, "--load", gpt_checkpoint),
        "another tokenizer": rm_args(prefs, 1, "--pretrained-checkpoint", gpt_checkpoint, "--vocab-size", VOCAB + 1),
        "--eval-out needs --valid-data-path": rm_args(prefs, 1, "--eval-out", tmp_path / "e.json"),
    }
    for message, argv in cases.items():
        capsys.readouterr()
        assert run_rm(argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (message, err)
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model_for_inference(gpt_checkpoint, ParallelState.single("cpu"))
