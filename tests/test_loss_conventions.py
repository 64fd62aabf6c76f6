"""Losses as users define them (Hugging Face / TRL, Megatron-LM's --calculate-per-token-loss):
rows that pad the vocabulary are no part of the model's distribution, a run takes its vocabulary
from the checkpoint it starts from, and a token-averaged loss does not depend on how the global
batch is split into micro-batches and data-parallel ranks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.transformer.config import TransformerConfig
from test_sft_training import TRAIN, run_sft, sft_worker, write_train_and_valid

REAL, ROWS = 100, 128


# ----- padded vocabulary rows -------------------------------------------------------------------
def test_cross_entropy_ignores_padding_columns_to_the_bit():
    """Whatever the padding columns hold, the vocab-parallel cross-entropy (and its gradient) is
    that of the unpadded logits, bit for bit; the padding columns get no gradient."""
    ps = ParallelState.single("cpu")
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(6, 5, REAL, generator=generator, dtype=torch.float64)
    target = torch.randint(0, REAL, (6, 5), generator=generator)
    for smoothing in (0.0, 0.1):
        want_logits = real.clone().requires_grad_()
        want = vocab_parallel_cross_entropy(want_logits, target, ps, smoothing)
        want.sum().backward()
        for fill in (0.0, 1e4, float("-inf")):
            padded = torch.cat([real, torch.full((6, 5, ROWS - REAL), fill, dtype=torch.float64)], -1).requires_grad_()
            got = vocab_parallel_cross_entropy(padded, target, ps, smoothing, vocab_size=REAL)
            got.sum().backward()
            assert torch.equal(got, want), (smoothing, fill)
            assert torch.equal(padded.grad[..., :REAL], want_logits.grad)
            assert not padded.grad[..., REAL:].any()
        reference = F.cross_entropy(real.flatten(0, 1), target.flatten(), reduction="none", label_smoothing=smoothing)
        torch.testing.assert_close(want.flatten(), reference, rtol=1e-12, atol=1e-12)


def build(ps: ParallelState) -> GPTModel:
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=ROWS,
                               unpadded_vocab_size=REAL, max_position_embeddings=16, hidden_dropout=0.0,
                               attention_dropout=0.0, params_dtype=torch.float64)
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=3)
    with torch.no_grad():  # padding rows that would dominate the softmax if they counted
        weight = model.output_layer.weight
        first = ps.tp_rank * weight.shape[0]
        for row in range(weight.shape[0]):
            if first + row >= REAL:
                weight[row] = 5.0
    return model


def model_losses(ps: ParallelState):
    model = build(ps)
    tokens = torch.randint(0, REAL, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    loss = model(tokens, labels)
    loss.sum().backward()
    grad = model.decoder.layers[0].mlp.linear_fc1.weight.grad
    logits = model(tokens).detach()
    return loss.detach(), grad, logits, tokens, labels


def tp2_worker(rank, world_size):
    ps = ParallelState.build(2, 1, device="cpu")
    loss, _, logits, _, _ = model_losses(ps)
    return loss, logits


@pytest.mark.distributed
def test_the_models_distribution_excludes_padding_rows_at_tp1_and_tp2():
    """A GPT whose 28 padding rows would dominate the softmax: its loss is -log_softmax of the
    unpadded logits (float64 reference), its returned logits are -inf in every padding column,
    and tensor parallelism 2 (where the padding falls on the second rank) gives the same."""
    ps = ParallelState.single("cpu")
    loss, grad, logits, tokens, labels = model_losses(ps)
    assert torch.isneginf(logits[..., REAL:]).all() and torch.isfinite(logits[..., :REAL]).all()
    want = -torch.log_softmax(logits[..., :REAL], -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert loss.mean() < 6.0  # the padding rows' logits (5 x |h|) would put it far above log(100) = 4.6
    for rank_loss, rank_logits in run_distributed(tp2_worker, 2):
        torch.testing.assert_close(rank_loss, loss, rtol=1e-10, atol=1e-10)
    rank0, rank1 = run_distributed(tp2_worker, 2)
    assert torch.isneginf(rank1[1][..., REAL - 64:]).all() and torch.isfinite(rank0[1]).all()


# ----- the per-token loss -------------------------------------------------------------------------
def first_record(path) -> dict:
    return json.loads(open(path).readline())


@pytest.fixture(scope="module")
def records32(tmp_path_factory):
    return write_train_and_valid(tmp_path_factory.mktemp("records32"), 32, 32, seed=21)


def split_runs(records32, tmp_path, level: str, extra=()) -> dict:
    """Iteration 1's record with the 32 records as 1 x 32, 4 x 8 and DP 2 x 2 x 8 micro-batches."""
    base = TRAIN + ["--data-path", str(records32 / "train"), "--train-iters", "1", "--eval-interval", "1",
                    "--global-batch-size", "32", "--no-sft-packing", "--fp8-level", level,
                    "--fp8-min-features", "32", "--fp8-recipe", "current", *extra]
    out = {}
    for name, micro in (("1x32", "32"), ("4x8", "8")):
        path = tmp_path / f"{level}-{name}.jsonl"
        assert run_sft(base + ["--micro-batch-size", micro, "--metrics-file", str(path)]) == 0
        out[name] = first_record(path)
    path = tmp_path / f"{level}-dp2.jsonl"
    assert run_distributed(sft_worker, 2, base + ["--micro-batch-size", "8", "--metrics-file", str(path)],
                           init_process_group=False, timeout=300) == [0, 0]
    out["dp2x2x8"] = first_record(path)
    return out


@pytest.mark.distributed
def test_sft_loss_and_gradient_do_not_depend_on_the_split(records32, tmp_path):
    """The 32 records' response loss and gradient norm are the same as one micro-batch of 32,
    four of 8, and two data-parallel ranks of two micro-batches of 8, and so is the validation loss
    of 32 other records (float tolerance at none,
    within the FP8 casts' noise at O3); with --no-calculate-per-token-loss they are not."""
    none = split_runs(records32, tmp_path, "none")
    assert all(r["loss_normalization"] == "per_token" for r in none.values())
    for name in ("4x8", "dp2x2x8"):
        for key in ("loss", "grad_norm", "val_loss"):
            assert none[name][key] == pytest.approx(none["1x32"][key], rel=1e-5), (name, key)
    old = split_runs(records32, tmp_path, "none", ["--no-calculate-per-token-loss"])
    assert old["1x32"]["loss"] == pytest.approx(none["1x32"]["loss"], rel=1e-6)  # one micro-batch: one mean
    assert old["4x8"]["loss_normalization"] == "per_micro_batch"
    assert abs(old["4x8"]["val_loss"] / none["1x32"]["val_loss"] - 1) > 5e-5
    assert abs(old["4x8"]["loss"] / none["1x32"]["loss"] - 1) > 5e-5  # the mean of means differs (1.2e-4)
    assert abs(old["4x8"]["grad_norm"] / none["1x32"]["grad_norm"] - 1) > 2e-3  # (4.7e-3)
    o3 = split_runs(records32, tmp_path, "O3")
    for label, runs in (("none", none), ("none, per micro-batch", old), ("O3", o3)):
        print(label, {name: (r["loss"], r["grad_norm"]) for name, r in runs.items()})
    for name in ("4x8", "dp2x2x8"):
        # Activation scales follow the micro-batch split: 5e-5 and 1.6e-3 apart when measured.
        assert o3[name]["loss"] == pytest.approx(o3["1x32"]["loss"], rel=5e-4), name
        assert o3[name]["grad_norm"] == pytest.approx(o3["1x32"]["grad_norm"], rel=1e-2), name
    assert o3["1x32"]["loss"] == pytest.approx(none["1x32"]["loss"], rel=1e-3)


def test_which_losses_are_per_token():
    """Off for pretraining unless asked (Megatron-LM's default), on for SFT, GRPO and PPO unless
    --no-calculate-per-token-loss; refused for a loss that averages over pairs (DPO, the reward model)."""
    from megatron.training.training import TrainingTask, per_token_loss

    def task(**kw):
        return TrainingTask(model_provider=None, forward_step=None, datasets_provider=None, tokens_per_sample=1, **kw)

    count = lambda batch: batch["loss_mask"].sum()  # noqa: E731
    pretraining, sft, pairs = task(loss_tokens=count), task(loss_tokens=count, per_token_loss=True), task(loss_key="dpo loss")
    assert [per_token_loss(flag, pretraining) for flag in (None, True, False)] == [False, True, False]
    assert [per_token_loss(flag, sft) for flag in (None, True, False)] == [True, True, False]
    assert [per_token_loss(flag, pairs) for flag in (None, False)] == [False, False]
    with pytest.raises(ValueError, match="the dpo loss is a mean over pairs or sequences, not tokens"):
        per_token_loss(True, pairs)
