"""DPO (rlhf/train_dpo.py): the loss starts at log 2 and equals an independent float64 computation
from the two models, the reference stays frozen, precomputed reference log-probabilities change
nothing, TP 2 and DP 2 train as one process does, a run learns separable pairs (at O3 too, with an
FP8 reference), resume is exact, bad input is one line; and the built-in RLHF data
(tools/builtin_rlhf.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rlhf_records
from distributed import run_distributed
from fp8.params import is_fp8_param
from megatron.core.datasets.chat_template import DefaultChatTemplate
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name
from megatron.core.precision import apply_precision
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.core.tokenizers.tokenizer import NullTokenizer
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.gpt_providers import gpt_task
from megatron.training.inference_model import load_gpt_for_inference
from megatron.training.resume import Checkpointer, layout_of
from megatron.training.training import TrainState
from rlhf import train_dpo
from rlhf.data import read_preference_pairs
from rlhf.dpo import DPOArgs, DPODataset, FrozenReference, pair_logprobs
from rlhf.losses import dpo_loss
from tools import builtin_rlhf, builtin_sft

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 60  # NullTokenizer ids 0..59, EOD (and padding) 60
SEQ = 24
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
         "--seq-length", str(SEQ), "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
         "--make-vocab-size-divisible-by", "16", "--device", "cpu", "--num-workers", "0",
         "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
         "--fp8-min-features", "32", "--fp8-recipe", "current"]
TRAIN = MODEL + ["--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--log-interval", "1",
                 "--eval-interval", "2", "--eval-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]


def write_pairs(path: Path, count: int, seed: int) -> Path:
    """Separable pairs: the chosen answer's ids (30..44) and the rejected one's (45..59) follow
    from the prompt's sum."""
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(count):
        prompt = rng.randint(1, 30, size=rng.randint(3, 7))
        answer = (prompt.sum() + np.arange(2)) % 15
        rows.append({"prompt": " ".join(map(str, prompt)), "chosen": " ".join(map(str, answer + 30)),
                     "rejected": " ".join(map(str, answer + 45))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_initialised_checkpoint(folder: Path, extra=()) -> None:
    """A freshly initialised GPT saved as training saves it (flags, signature, layout)."""
    config = parse_config(MODEL + list(extra) + ["--train-iters", "1", "--lr", "1e-3", "--save", str(folder)])
    config = config.for_world(1)
    ps = ParallelState.single("cpu")
    tokenizer = NullTokenizer(VOCAB)
    task = gpt_task(config, ps, tokenizer.vocab_size, tokenizer.eod)
    rng = model_parallel_seed(ps, config.seed)
    model = task.model_provider(config, ps, rng)
    apply_precision(model, config.precision.fp8_config(), ps)
    Checkpointer(config, ps, model, None, rng, train_state=TrainState(), components={},
                 layout=layout_of(ps, False), global_name=global_name, signature=task.model_signature).save()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    save_initialised_checkpoint(root / "sft")
    write_pairs(root / "train.jsonl", 40, seed=1)
    write_pairs(root / "valid.jsonl", 16, seed=2)
    return root


def base_args(root: Path, iters: int) -> list[str]:
    return TRAIN + ["--train-iters", str(iters), "--pretrained-checkpoint", str(root / "sft"),
                    "--data-path", str(root / "train.jsonl"), "--valid-data-path", str(root / "valid.jsonl")]


metrics = rlhf_records  # the records with their "rlhf" values at the top


def losses(path) -> list[float]:
    return [r["loss"] for r in metrics(path)]


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """The single-process reference run: 4 iterations, reference log-probabilities on the fly."""
    out = tmp_path_factory.mktemp("straight") / "metrics.jsonl"
    run = train_dpo.run(base_args(setup, 4) + ["--metrics-file", str(out)])
    return run, metrics(out)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's bytes (and an FP8 weight's scale), for bitwise comparison."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().contiguous().view(torch.uint8).clone()
        if is_fp8_param(p):
            out[name + ".scale"] = p.scale.detach().reshape(-1).view(torch.uint8).clone()
    return out


def pair_data(root: Path, num_samples: int) -> DPODataset:
    pairs, _ = read_preference_pairs(root / "train.jsonl", DefaultChatTemplate(NullTokenizer(VOCAB)), max_tokens=SEQ)
    return DPODataset(pairs, seq_length=SEQ, num_samples=num_samples, seed=1234, pad_id=VOCAB)


@torch.no_grad()
def float64_logprobs(model, sample) -> torch.Tensor:
    """(chosen, rejected) answer log-probabilities from the full-vocabulary logits, in float64."""
    logits = model(sample["tokens"]).double()  # [2, s, padded vocab]
    token = torch.log_softmax(logits, dim=-1).gather(-1, sample["labels"][..., None]).squeeze(-1)
    return (token * sample["loss_mask"].double()).sum(-1)


def test_loss_starts_at_log2_matches_float64_reference_and_resumes_exactly(setup, straight, tmp_path):
    run, records = straight
    first = records[0]
    # Step 0: the policy is the reference, so every reward is 0: loss log 2, ties count one half.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["accuracy"] == 0.5 and first["reward_margin"] == 0.0 and first["chosen_reward"] == 0.0
    assert [r["iteration"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[1]
    # The reference never changes: bit for bit what the checkpoint holds.
    fresh = load_gpt_for_inference(str(setup / "sft"), ParallelState.single("cpu"), params_dtype=torch.float32)
    before, after = snapshot(fresh.model), snapshot(run.data.reference.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Stop after 2 and resume: the same losses to the bit; iteration 3's loss is the DPO loss of
    # its 8 pairs computed independently from the saved policy and the reference, in float64.
    ckpt, split = tmp_path / "ckpt", tmp_path / "split.jsonl"
    args = base_args(setup, 4) + ["--save", str(ckpt), "--metrics-file", str(split)]
    assert run_cli(lambda: train_dpo.main(args + ["--exit-interval", "2"])) == 0
    policy = load_gpt_for_inference(str(ckpt), ParallelState.single("cpu"), params_dtype=torch.float32).model
    data = pair_data(setup, 32)
    values = torch.stack([torch.stack([float64_logprobs(policy, data[i]), float64_logprobs(fresh.model, data[i])])
                          for i in range(16, 24)])  # [pair, model, side]
    want = dpo_loss(values[:, 0, 0], values[:, 0, 1], values[:, 1, 0], values[:, 1, 1], beta=0.1)
    assert records[2]["loss"] == pytest.approx(want["loss"].item(), rel=1e-5)
    assert records[2]["reward_margin"] == pytest.approx(want["reward_margin"].item(), rel=1e-4, abs=1e-6)
    assert run_cli(lambda: train_dpo.main(args + ["--load", str(ckpt)])) == 0
    assert losses(split) == [r["loss"] for r in records]


def test_precomputed_reference_logprobs_give_the_same_losses(setup, straight, tmp_path):
    run, records = straight
    out = tmp_path / "pre.jsonl"
    pre = train_dpo.run(base_args(setup, 4) + ["--precompute-reference-logprobs", "--metrics-file", str(out),
                                                "--eval-out", str(tmp_path / "eval.json")])
    assert losses(out) == pytest.approx([r["loss"] for r in records], rel=1e-6, abs=1e-7)
    assert [r["val_loss"] for r in metrics(out) if "val_loss" in r] == \
        pytest.approx([r["val_loss"] for r in records if "val_loss" in r], rel=1e-6)
    assert json.loads((tmp_path / "eval.json").read_text()) == pytest.approx(run.evaluation, rel=1e-6, abs=1e-7)
    assert pre.evaluation["pairs"] == 16


def dpo_worker(rank, world_size, argv):
    return train_dpo.run(argv).evaluation


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--precompute-reference-logprobs"]], ids=["tp2", "dp2"])
def test_tp2_and_dp2_train_as_one_process(setup, straight, tmp_path, layout):
    run, records = straight
    out = tmp_path / "metrics.jsonl"
    results = run_distributed(dpo_worker, 2, base_args(setup, 4) + layout + ["--metrics-file", str(out)],
                              init_process_group=False, timeout=300)
    got = metrics(out)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in records], rel=1e-5)
    assert [r["accuracy"] for r in got] == [r["accuracy"] for r in records]
    assert [r["reward_margin"] for r in got] == pytest.approx([r["reward_margin"] for r in records], rel=1e-3, abs=1e-6)
    for evaluation in results:
        assert evaluation == pytest.approx(run.evaluation, rel=1e-4, abs=1e-6)


def test_o3_policy_with_fp8_reference_learns_separable_pairs(setup, tmp_path):
    """An FP8 (O3) reference holds one-byte weights and gives log-probabilities close to the
    high-precision one; DPO at O3 against it learns to prefer the chosen answers."""
    ps = ParallelState.single("cpu")
    pairs, _ = read_preference_pairs(setup / "valid.jsonl", DefaultChatTemplate(NullTokenizer(VOCAB)), max_tokens=SEQ)
    tables = {}
    for level in ("none", "O3"):
        reference = FrozenReference(str(setup / "sft"), ps, params_dtype=torch.float32, fp8_level=level)
        fp8 = [n for n, p in reference.model.named_parameters() if is_fp8_param(p)]
        assert (len(fp8) > 0) == (level == "O3")
        tables[level] = pair_logprobs(reference.model, pairs, ps, seq_length=SEQ, micro_batch_size=4, pad_id=VOCAB)
    assert tables["O3"].shape == (16, 2) and (tables["none"] < 0).all()
    torch.testing.assert_close(tables["O3"], tables["none"], rtol=0.02, atol=0.05)
    out = tmp_path / "o3.jsonl"
    run = train_dpo.run(base_args(setup, 5) + ["--fp8-level", "O3", "--reference-fp8-level", "O3", "--lr", "1e-2",
                                                "--micro-batch-size", "4", "--eval-interval", "100",
                                                "--metrics-file", str(out)])
    records = metrics(out)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.02)
    assert sum(r["loss"] for r in records[-2:]) / 2 < records[0]["loss"] - 0.08
    assert sum(r["accuracy"] for r in records[-2:]) / 2 > 0.8
    assert run.evaluation["accuracy"] > 0.9 and run.evaluation["reward_margin"] > 0
    assert run.evaluation["policy_prefers_chosen"] > run.evaluation["reference_prefers_chosen"]


def test_bad_input_is_one_line_and_exit_code_2(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 2", "chosen": "31", "rejected": "46"}) + "\n"
                   + json.dumps({"prompt": "1 2", "chosen": "31"}) + "\n")
    args = base_args(setup, 1)
    cases = {
        "no 'rejected' side": args + ["--data-path", str(bad)],
        "another tokenizer": [a if a != str(VOCAB) else "70" for a in args],
        "pipeline": args + ["--pipeline-model-parallel-size", "2"],
    }
    script = str(REPO_ROOT / "rlhf" / "train_dpo.py")
    started = {k: subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=tmp_path) for k, argv in cases.items()}
    for expected, process in started.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr


def test_dpo_flags_check_themselves():
    for flags, message in ((["--dpo-beta", "0"], "--dpo-beta"), (["--dpo-label-smoothing", "0.5"], "smoothing"),
                           (["--eval-out", "x.json"], "--valid-data-path")):
        with pytest.raises(ValueError, match=message):
            parse_config(TRAIN + ["--train-iters", "1"] + flags, extra_sections={"dpo": DPOArgs})


# ----- the built-in RLHF data ---------------------------------------------------------------------
def test_builtin_rlhf_data(builtin_corpus_small, tmp_path, monkeypatch, capsys):
    model = builtin_corpus_small.tokenizer_model
    first = builtin_rlhf.ensure_builtin_rlhf(tmp_path / "a", tokenizer_model=model)
    builtin_rlhf.ensure_builtin_rlhf(tmp_path / "b", tokenizer_model=model)
    for name in builtin_rlhf.FILES:  # deterministic: two builds are the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert builtin_rlhf.ensure_builtin_rlhf(tmp_path / "a", tokenizer_model=model) == first  # up to date
    read = {name: [json.loads(line) for line in open(tmp_path / "a" / name)] for name in builtin_rlhf.FILES}
    qualified = {name: {r["prompt"].split("`")[1] for r in rows} for name, rows in read.items()}
    names = builtin_sft.stdlib_names()
    held = {f"{m}.{n}" for m, n, _ in names if builtin_sft.held_out(m, n)}
    assert qualified["preferences-test.jsonl"] == held == qualified["prompts-test.jsonl"]
    assert not qualified["preferences-train.jsonl"] & held
    assert len(read["preferences-train.jsonl"]) + len(read["preferences-test.jsonl"]) == 3 * len(names)
    test_names = {q.rsplit(".", 1)[1] for q in held}
    train_names = {q.rsplit(".", 1)[1] for q in qualified["preferences-train.jsonl"]}
    for split in ("train", "test"):
        prefs, prompts = read[f"preferences-{split}.jsonl"], read[f"prompts-{split}.jsonl"]
        assert [p["prompt"] for p in prefs] == [p["prompt"] for p in prompts]
        assert all(p["chosen"] == q["answer"] and p["chosen"] != p["rejected"] for p, q in zip(prefs, prompts))
        wrong_names = {p["rejected"] for p in prefs if p["prompt"].startswith("What is")}
        assert wrong_names <= (train_names if split == "train" else test_names)
    assert {p["rejected"] for p in read["preferences-test.jsonl"] if p["prompt"].startswith("Is")} <= {"class",
                                                                                                        "function"}
    assert first["max_tokens"] <= builtin_sft.SEQ_LENGTH
    for split in ("train", "test"):  # the GRPO demo's task: exactly the module questions, answers included
        prompts = read[f"prompts-{split}.jsonl"]
        modules = [r for r in prompts if r["prompt"].startswith("Which module does")]
        assert read[f"module-prompts-{split}.jsonl"] == modules and len(modules) * 3 == len(prompts)
        assert all(r["prompt"].split("`")[1].startswith(r["answer"] + ".") for r in modules)
    # --print-args: flags train_dpo.py accepts, naming the files.
    monkeypatch.setattr(builtin_rlhf, "ensure_builtin_corpus", lambda **kw: builtin_corpus_small)
    assert builtin_rlhf.main(["--data-dir", str(tmp_path / "a"), "--print-args", "--quiet"]) == 0
    printed = capsys.readouterr().out.split()
    config = parse_config(printed + ["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "1",
                                     "--seq-length", "64", "--train-iters", "1", "--lr", "1e-3"],
                          extra_sections={"dpo": DPOArgs})
    assert config.data.data_path == [str(tmp_path / "a" / "preferences-train.jsonl")]
    assert config.extra["dpo"].valid_data_path == str(tmp_path / "a" / "preferences-test.jsonl")
    assert builtin_rlhf.main(["--data-dir", str(tmp_path / "a"), "--print-rl-args", "--quiet"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[printed.index("--data-path") + 1] == str(tmp_path / "a" / "module-prompts-train.jsonl")
