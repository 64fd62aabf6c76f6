"""PPO end to end on a tiny model: actor and critic trained together on the actor's rollouts, the
reward from a Python function or a frozen reward model, the frozen reference; learning, layouts,
resume with the adaptive KL coefficient, the saved actor, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.inference_model import load_gpt_for_inference
from megatron.training.training import Trainer, setup_parallel
from rlhf import train_ppo, train_reward_model
from rlhf.models import load_reward_model_for_inference
from rlhf.policy_gradient import RLArgs
from rlhf.ppo import PPOArgs, ppo_task
from test_rlhf_grpo import MODEL, VOCAB, records, setup  # noqa: F401 - `setup` is the shared fixture


def ppo_argv(root, *extra):
    return MODEL + ["--pretrained-checkpoint", str(root / "sft-ckpt"), "--data-path", str(root / "prompts.jsonl"),
                    "--reward-fn", "grpo_rewards:even_tokens", "--rollout-prompts", "8", "--group-size", "1",
                    "--max-new-tokens", "6", "--micro-batch-size", "2", "--global-batch-size", "4",
                    "--ppo-epochs", "2", "--kl-coef", "0.05", "--lr", "3e-3", "--lr-warmup-iters", "0",
                    "--train-iters", "3", *extra]


def run(argv) -> int:
    return run_cli(lambda: train_ppo.main(argv))


def ppo_worker(rank, world_size, argv, root):
    import sys
    sys.path.insert(0, str(root))
    return run(argv)


@pytest.fixture(scope="module")
def reward_model(setup):  # noqa: F811
    """A reward model checkpoint: the SFT backbone and a head trained for two steps on pairs whose
    chosen answer is all even ids."""
    pairs = setup / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(16):
            prompt = " ".join(str((i * 7 + k) % VOCAB) for k in range(3))
            f.write(json.dumps({"prompt": prompt, "chosen": f"{2 * (i % 20)} {2 * ((i + 3) % 20)}",
                                "rejected": f"{2 * (i % 20) + 1} {2 * ((i + 5) % 20) + 1}"}) + "\n")
    out = setup / "rm-ckpt"
    argv = MODEL + ["--pretrained-checkpoint", str(setup / "sft-ckpt"), "--data-path", str(pairs), "--train-iters", "2",
                    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "0",
                    "--eval-iters", "0", "--save", str(out)]
    assert run_cli(lambda: train_reward_model.main(argv)) == 0
    return out


def test_ppo_learns_keeps_frozen_models_and_saves_a_loadable_actor(setup, reward_model, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.syspath_prepend(str(setup))
    save = tmp_path / "ckpt"
    argv = ppo_argv(setup, "--train-iters", "12", "--rollout-prompts", "16", "--global-batch-size", "16",
                    "--micro-batch-size", "8", "--lr", "1e-2", "--metrics-file", str(tmp_path / "m.jsonl"),
                    "--save", str(save))
    config = parse_config(argv, extra_sections={"rl": RLArgs, "ppo": PPOArgs})
    config, ps = setup_parallel(config)
    try:
        tokenizer_config = config.tokenizer.tokenizer_config()
        trainer = Trainer(config, ps, ppo_task(config, ps, build_tokenizer(tokenizer_config), tokenizer_config))
        reference = {n: p.detach().clone() for n, p in trainer.experience.reference.named_parameters()}
        critic_start = {n: p.detach().clone() for n, p in trainer.model.critic.named_parameters()}
        trainer.train()
        trainer.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    got = records(tmp_path / "m.jsonl")
    for r in got:
        assert {"reward", "kl", "entropy", "clip_fraction", "policy_loss", "value_loss", "kl_coef"} <= set(r)
        assert r["consumed_samples"] == 16 * r["iteration"]
    first, last = sum(r["reward"] for r in got[:3]) / 3, sum(r["reward"] for r in got[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert got[-1]["value_loss"] < got[0]["value_loss"]  # the critic learns the returns
    for name, value in trainer.experience.reference.named_parameters():
        assert torch.equal(value, reference[name]), name
    assert any(not torch.equal(p, critic_start[n]) for n, p in trainer.model.critic.named_parameters())
    # The checkpoint's actor loads as a GPT (tools/generate.py, tools/sft_eval.py) with the trained weights.
    actor = load_gpt_for_inference(str(save), ParallelState.single("cpu")).model
    trained = dict(trainer.model.actor.named_parameters())
    for name, value in actor.named_parameters():
        assert torch.equal(value, trained[name].detach()), name


def test_ppo_with_a_reward_model_layouts_and_exact_resume(setup, reward_model, tmp_path):  # noqa: F811
    """Rewards from a frozen reward model (the critic starts from it); DP2 and TP2 give DP1's
    rewards and losses; stopping and resuming (adaptive KL coefficient included) changes nothing."""
    base = ppo_argv(setup, "--reward-model", str(reward_model), "--kl-target", "0.01", "--kl-horizon", "20")
    base.remove("--reward-fn")
    base.remove("grpo_rewards:even_tokens")
    one = tmp_path / "one.jsonl"
    assert run_distributed(ppo_worker, 1, base + ["--metrics-file", str(one)], setup,
                           init_process_group=False, timeout=300) == [0]
    want = records(one)
    assert len({r["kl_coef"] for r in want}) == 3  # adapted every iteration
    # The reward is the reward model's value at the completion's last token.
    model = load_reward_model_for_inference(str(reward_model), ParallelState.single("cpu")).model
    assert want[0]["frozen_memory"]["reward_model_weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    for name, layout in (("dp2", []), ("tp2", ["--tensor-model-parallel-size", "2"])):
        out = tmp_path / f"{name}.jsonl"
        assert run_distributed(ppo_worker, 2, base + layout + ["--metrics-file", str(out)], setup,
                               init_process_group=False, timeout=300) == [0, 0]
        got = records(out)
        for key in ("reward", "loss", "value_loss", "kl_coef"):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4, abs=1e-5), (name, key)
    straight, split, ckpt = tmp_path / "straight.jsonl", tmp_path / "split.jsonl", tmp_path / "ckpt"
    argv = base + ["--train-iters", "4"]
    assert run_distributed(ppo_worker, 1, argv + ["--metrics-file", str(straight)], setup,
                           init_process_group=False, timeout=300) == [0]
    assert run_distributed(ppo_worker, 1, argv + ["--save", str(ckpt), "--exit-interval", "2",
                                                  "--metrics-file", str(split)], setup,
                           init_process_group=False, timeout=300) == [0]
    assert run_distributed(ppo_worker, 1, argv + ["--save", str(ckpt), "--load", str(ckpt),
                                                  "--metrics-file", str(split)], setup,
                           init_process_group=False, timeout=300) == [0]
    for key in ("loss", "reward", "kl", "kl_coef", "value_loss"):
        assert [r[key] for r in records(split)] == [r[key] for r in records(straight)], key


def test_ppo_bad_input(setup, reward_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.syspath_prepend(str(setup))
    cases = [
        (["--reward-model", str(setup / "sft-ckpt")], "not a reward model's"),
        (["--reward-model", str(reward_model)], "give one of --reward-fn"),
        (["--critic-checkpoint", str(tmp_path / "nowhere")], "--critic-checkpoint"),
        (["--gamma", "1.5"], "--gamma and --lam must lie in [0, 1]"),
    ]
    for extra, fragment in cases:
        argv = ppo_argv(setup, *extra)
        if extra[0] == "--reward-model" and fragment != "give one of --reward-fn":
            argv = [a for a in argv if a not in ("--reward-fn", "grpo_rewards:even_tokens")]
        capsys.readouterr()
        assert run(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (extra, err)


def test_ppo_at_o3_with_fp8_frozen_models(setup, reward_model, tmp_path):  # noqa: F811
    """Actor and critic at O3, reference and reward model holding FP8 weights: it trains with finite
    losses, and both the trained pair's and the frozen models' weights take under 60% of their
    FP32 bytes."""
    runs = {}
    for level in ("none", "O3"):
        out = tmp_path / f"{level}.jsonl"
        argv = ppo_argv(setup, "--reward-model", str(reward_model), "--fp8-level", level, "--reference-fp8-level",
                        level, "--reward-model-fp8-level", level, "--fp8-min-features", "16", "--train-iters", "2",
                        "--metrics-file", str(out))
        argv = [a for a in argv if a not in ("--reward-fn", "grpo_rewards:even_tokens")]
        assert run(argv) == 0
        runs[level] = records(out)
    for level, got in runs.items():
        assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in got), level
    frozen = {level: sum(got[0]["frozen_memory"].values()) for level, got in runs.items()}
    assert frozen["O3"] < 0.6 * frozen["none"]
    assert runs["O3"][0]["memory"]["weight_bytes"] < 0.6 * runs["none"][0]["memory"]["weight_bytes"]
