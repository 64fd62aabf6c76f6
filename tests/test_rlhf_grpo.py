"""GRPO end to end on a tiny model: rollouts from the policy being trained, the frozen reference,
rewards from a Python function; learning, layouts, resume and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from conftest import rlhf_records
from distributed import run_distributed
from megatron.core.inference.generation import generate
from megatron.core.inference.sampling import SamplingParams
from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.training import Trainer, setup_parallel
from rlhf import train_grpo
from rlhf.policy_gradient import RLArgs, grpo_task

VOCAB = 60  # test_sft_training.synthetic_samples draws ids below 60
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
         "--seq-length", "24", "--max-position-embeddings", "24", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "16", "--device", "cpu",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--normalization", "RMSNorm", "--swiglu",
         "--position-embedding-type", "rope", "--num-workers", "0", "--log-interval", "1"]

REWARDS = '''
import math
def even_tokens(completions, records):
    """The share of even ids among the completion's tokens (0 for an empty completion)."""
    out = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        out.append(sum(1 for i in ids if i % 2 == 0) / len(ids) if ids else 0.0)
    return out
def raises(completions, records):
    raise RuntimeError("the scorer is down")
def not_finite(completions, records):
    return [math.nan] * len(completions)
def too_few(completions, records):
    return [0.0]
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny policy checkpoint (an SFT run's stand-in: initial weights, saved by the trainer),
    a prompt file and a reward module."""
    import finetune_sft
    from test_sft_training import synthetic_samples, write_sft

    root = tmp_path_factory.mktemp("grpo")
    write_sft(root / "sft", synthetic_samples(16, seed=3, max_len=10))
    argv = MODEL + ["--data-path", str(root / "sft"), "--train-iters", "2", "--micro-batch-size", "2",
                    "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "0", "--save", str(root / "sft-ckpt"),
                    "--eval-iters", "0"]
    assert run_cli(lambda: finetune_sft.main(argv)) == 0
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": " ".join(str((i * 5 + k) % VOCAB) for k in range(3 + i % 3))}) + "\n")
    (root / "grpo_rewards.py").write_text(REWARDS)
    return root


def grpo_argv(root, *extra):
    return MODEL + ["--pretrained-checkpoint", str(root / "sft-ckpt"), "--data-path", str(root / "prompts.jsonl"),
                    "--reward-fn", "grpo_rewards:even_tokens", "--rollout-prompts", "4", "--group-size", "4",
                    "--max-new-tokens", "6", "--micro-batch-size", "2", "--global-batch-size", "8",
                    "--lr", "3e-3", "--lr-warmup-iters", "0", "--train-iters", "3", *extra]


records = rlhf_records  # the records with their "rlhf" values at the top


def run(argv) -> int:
    return run_cli(lambda: train_grpo.main(argv))


def grpo_worker(rank, world_size, argv, root):
    import sys
    sys.path.insert(0, str(root))
    return run(argv)


def test_rollout_logprobs_and_the_frozen_reference(setup, monkeypatch):
    """In one process: the rollouts' sampling log-probabilities equal a fresh forward pass's; the
    frozen reference stays bit-identical through training while the policy moves."""
    monkeypatch.syspath_prepend(str(setup))
    argv = grpo_argv(setup)
    config = parse_config(argv, extra_sections={"rl": RLArgs})
    config, ps = setup_parallel(config)
    try:
        tokenizer_config = config.tokenizer.tokenizer_config()
        tokenizer = build_tokenizer(tokenizer_config)
        trainer = Trainer(config, ps, grpo_task(config, ps, tokenizer, tokenizer_config))
        experience = trainer.experience
        reference = {n: p.detach().clone() for n, p in experience.reference.named_parameters()}
        # Sampling log-probabilities (the KV-cache decoder's) against the fresh forward's.
        prompts = [experience.prompts.tokens[i] for i in range(4)]
        results = generate(trainer.model, prompts, SamplingParams(max_new_tokens=6, seed=5),
                           vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod, ps=ps, max_length=experience.length)
        batch = experience._sequences(results)
        with torch.no_grad():  # the sampled distribution: the tokenizer's ids (padded rows never drawn)
            logits = trainer.model(batch["tokens"])[..., :tokenizer.vocab_size].double()
            fresh = torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
        assert sum(len(r.tokens) for r in results) == int(batch["mask"].sum()) > 0
        for row, result in enumerate(results):
            assert fresh[row][batch["mask"][row] > 0].tolist() == pytest.approx(result.logprobs, abs=1e-5)
        policy = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        state = trainer.train()
        trainer.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert state.iteration == 3
    for name, value in experience.reference.named_parameters():
        assert torch.equal(value, reference[name]), name
    assert any(not torch.equal(p, policy[n]) for n, p in trainer.model.named_parameters())


def test_grpo_reward_rises_and_records(setup, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(setup))
    out = tmp_path / "m.jsonl"
    assert run(grpo_argv(setup, "--train-iters", "16", "--rollout-prompts", "4", "--group-size", "8",
                         "--global-batch-size", "32", "--micro-batch-size", "8", "--lr", "1e-2",
                         "--metrics-file", str(out))) == 0
    got = records(out)
    assert [r["iteration"] for r in got] == list(range(1, 17))
    for r in got:
        assert {"reward", "kl", "entropy", "response_length", "clip_fraction", "policy_loss", "kl_k3"} <= set(r)
        assert r["consumed_samples"] == 32 * r["iteration"]
        assert r["frozen_memory"]["reference_weight_bytes"] > 0
    first = sum(r["reward"] for r in got[:4]) / 4
    last = sum(r["reward"] for r in got[-4:]) / 4
    assert last > first + 0.15, (first, last)


def test_grpo_layouts_agree_and_resume_exactly(setup, tmp_path):
    base = grpo_argv(setup)
    one = tmp_path / "one.jsonl"
    assert run_distributed(grpo_worker, 1, base + ["--metrics-file", str(one)], setup,
                           init_process_group=False, timeout=300) == [0]
    want = records(one)
    for name, layout in (("dp2", []), ("tp2", ["--tensor-model-parallel-size", "2"])):
        out = tmp_path / f"{name}.jsonl"
        assert run_distributed(grpo_worker, 2, base + layout + ["--metrics-file", str(out)], setup,
                               init_process_group=False, timeout=300) == [0, 0]
        got = records(out)
        # The same rollouts (seeded per prompt and sample, not per rank): equal rewards; losses
        # equal up to the order of the reductions.
        assert [r["reward"] for r in got] == pytest.approx([r["reward"] for r in want], abs=1e-6), name
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4, abs=1e-6), name
    ckpt, split = tmp_path / "ckpt", tmp_path / "split.jsonl"
    argv = base + ["--train-iters", "4", "--save", str(ckpt)]
    straight = tmp_path / "straight.jsonl"
    assert run_distributed(grpo_worker, 1, argv + ["--metrics-file", str(straight), "--save", str(tmp_path / "s")],
                           setup, init_process_group=False, timeout=300) == [0]
    assert run_distributed(grpo_worker, 1, argv + ["--exit-interval", "2", "--metrics-file", str(split)], setup,
                           init_process_group=False, timeout=300) == [0]
    assert run_distributed(grpo_worker, 1, argv + ["--load", str(ckpt), "--metrics-file", str(split)], setup,
                           init_process_group=False, timeout=300) == [0]
    for key in ("loss", "reward", "kl"):
        assert [r[key] for r in records(split)] == [r[key] for r in records(straight)], key


def test_grpo_at_o3_with_an_fp8_reference(setup, tmp_path, monkeypatch):
    """The policy at O3 (FP8 weights, gradients and Adam states) and the reference holding one-byte
    weights: it trains, and the reference's weights take about a quarter of FP32's bytes."""
    monkeypatch.syspath_prepend(str(setup))
    sizes = {}
    for level in ("none", "O3"):
        out = tmp_path / f"{level}.jsonl"
        assert run(grpo_argv(setup, "--fp8-level", level, "--reference-fp8-level", level, "--fp8-min-features", "16",
                             "--metrics-file", str(out))) == 0
        got = records(out)
        assert all(math.isfinite(r["loss"]) for r in got)
        sizes[level] = got[0]["frozen_memory"]["reference_weight_bytes"]
    assert sizes["O3"] < 0.6 * sizes["none"]


@pytest.mark.parametrize("case, fragment", [
    (["--reward-fn", "grpo_rewards:raises"], "raised RuntimeError: the scorer is down"),
    (["--reward-fn", "grpo_rewards:not_finite"], "rewards must be finite"),
    (["--reward-fn", "grpo_rewards:too_few"], "returned 1 values for 16 completions"),
    (["--reward-fn", "grpo_rewards:missing"], "has no function 'missing'"),
    (["--reward-fn", "no_such_module_here:f"], "cannot import no_such_module_here"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "1"], "drop --sequence-parallel"),
    (["--group-size", "1"], "--group-size 2 or more"),
    (["--vocab-size", str(VOCAB + 8)], "another tokenizer"),
])
def test_bad_input_is_one_line_and_keeps_the_checkpoint(setup, tmp_path, monkeypatch, capsys, case, fragment):
    monkeypatch.syspath_prepend(str(setup))
    ckpt = tmp_path / "ckpt"
    assert run(grpo_argv(setup, "--train-iters", "2", "--exit-interval", "1", "--save", str(ckpt))) == 0
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = run(grpo_argv(setup, "--train-iters", "2", "--save", str(ckpt), "--load", str(ckpt), *case))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


def test_bad_prompt_record(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(setup))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 2"}) + "\n" + json.dumps({"question": "1 2"}) + "\n")
    argv = grpo_argv(setup)
    argv[argv.index("--data-path") + 1] = str(bad)
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2" in err[0] and "'prompt'" in err[0]


def test_rlhf_summary_reads_the_demo_folder(tmp_path, capsys):
    """tools/rlhf_summary.py: the reward's first and last ten iterations, held-out figures."""
    from tools import rlhf_summary
    (tmp_path / "eval-sft.json").write_text(json.dumps({"exact_match_rate": 0.25, "samples": 8}))
    rewards = [0.1 * (i % 5) + 0.01 * i for i in range(25)]
    (tmp_path / "grpo-O3").mkdir()
    (tmp_path / "grpo-O3" / "metrics.jsonl").write_text(
        "".join(json.dumps({"iteration": i + 1, "rlhf": {"reward": r}}) + "\n" for i, r in enumerate(rewards)))
    (tmp_path / "eval-grpo-O3.json").write_text(json.dumps({"exact_match_rate": 0.375, "samples": 8}))
    assert run_cli(lambda: rlhf_summary.main([str(tmp_path)])) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    row = summary["grpo"]["O3"]
    assert row["reward_first"] == pytest.approx(sum(rewards[:10]) / 10)
    assert row["reward_last"] == pytest.approx(sum(rewards[-10:]) / 10)
    assert row["heldout_sampled_exact_match"] == 0.375 and summary["sft_sampled_exact_match"] == 0.25
    assert "37.5%" in capsys.readouterr().out
    (tmp_path / "grpo-O3" / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "loss": 1.0}) + "\n")
    assert run_cli(lambda: rlhf_summary.main([str(tmp_path)])) == 2
    assert "no rlhf.reward" in capsys.readouterr().err


def test_checkpoints_record_their_tokenizer_and_rlhf_checks_it(setup, tmp_path):
    """The fingerprint a run records at save time decides, not the file its flags name today (a
    tokenizer retrained in place keeps its path but not its bytes)."""
    import shutil
    from megatron.core.checkpoint_integrity import write_manifest
    from megatron.core.tokenizers.tokenizer import TokenizerConfig, tokenizer_fingerprint
    from rlhf.common import check_same_tokenizer

    run = TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup / "sft-ckpt", ckpt)
    metadata_path = next(ckpt.glob("iter_*/metadata.json"))
    metadata = json.loads(metadata_path.read_text())
    assert metadata["tokenizer"] == tokenizer_fingerprint(run)
    check_same_tokenizer(run, {"SFT model": str(ckpt)})
    metadata["tokenizer"]["sha256"] = "0" * 64
    metadata_path.write_text(json.dumps(metadata))
    write_manifest(metadata_path.parent)  # a whole checkpoint, whose run used another tokenizer file
    with pytest.raises(ValueError, match="another tokenizer \\(sha256"):
        check_same_tokenizer(run, {"SFT model": str(ckpt)})
