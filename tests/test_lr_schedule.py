"""The learning-rate schedule against hand-computed values, its flag checks, and its checkpoint state."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from megatron.training.config import ScheduleArgs
from megatron.training.lr_schedule import LRScheduleConfig, LRScheduler


def scheduler(**kwargs) -> LRScheduler:
    train_iters = kwargs.pop("train_iters", None)
    return LRScheduler(LRScheduleConfig(**kwargs), train_iters=train_iters)


# lr 1.0, min_lr 0.1, warm-up 10, decay to iteration 110: the decay window is 100 iterations long,
# so iteration 10 + 100 r sits at fraction r of it.
WINDOW = dict(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)


@pytest.mark.parametrize(
    "style, expected",
    [
        # iteration:   0     5     10    35        60    85        110   111   1000
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1]),
        # 0.1 + 0.9 * (1 + cos(pi r)) / 2 for r = 1/4, 1/2, 3/4
        ("cosine", [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.8535533905932737, 0.55, 0.1 + 0.9 * 0.14644660940672627,
                    0.1, 0.1, 0.1]),
    ],
)
def test_warmup_decay_and_after(style, expected):
    sched = scheduler(decay_style=style, **WINDOW)
    iterations = [0, 5, 10, 35, 60, 85, 110, 111, 1000]
    assert [sched.lr_at(i) for i in iterations] == pytest.approx(expected, abs=1e-12)


def test_inverse_square_root():
    sched = scheduler(lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=1000, decay_style="inverse-square-root")
    assert sched.lr_at(2) == pytest.approx(0.5)  # warm-up
    assert sched.lr_at(4) == pytest.approx(1.0)
    assert sched.lr_at(16) == pytest.approx(0.5)  # sqrt(4 / 16)
    assert sched.lr_at(100) == pytest.approx(0.2)  # sqrt(4 / 100)
    assert sched.lr_at(900) == pytest.approx(0.1)  # sqrt(4 / 900) = 0.067, floored at min_lr
    assert sched.lr_at(2000) == pytest.approx(0.1)
    no_warmup = scheduler(lr=1.0, decay_iters=100, decay_style="inverse-square-root")
    assert [no_warmup.lr_at(i) for i in (0, 1, 4)] == pytest.approx([1.0, 1.0, 0.5])


@pytest.mark.parametrize(
    "anneal, at_95, at_100",
    [
        ("linear", 0.75, 0.5),
        ("cosine", 0.8535533905932737, 0.5),
        ("exponential", 2 * 0.5 ** 0.25 - 1, 2 * 0.5 ** 0.5 - 1),
        ("minus_sqrt", 0.5, 1 - math.sqrt(0.5)),
    ],
)
def test_wsd_holds_then_anneals_over_the_last_iterations(anneal, at_95, at_100):
    # Anneal over the last 20 of 110 iterations: it starts after iteration 90.
    sched = scheduler(lr=1.0, min_lr=0.0, warmup_iters=10, decay_iters=110, decay_style="WSD",
                      wsd_decay_iters=20, wsd_decay_style=anneal)
    assert [sched.lr_at(i) for i in (5, 10, 50, 90)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert sched.lr_at(95) == pytest.approx(at_95)
    assert sched.lr_at(100) == pytest.approx(at_100)
    assert sched.lr_at(110) == pytest.approx(0.0, abs=1e-12)
    assert sched.lr_at(111) == 0.0


def test_no_warmup_starts_at_the_peak_and_decay_defaults_to_train_iters():
    sched = scheduler(lr=2.0, decay_style="linear", train_iters=100)
    assert sched.lr_at(0) == 2.0
    assert sched.lr_at(50) == pytest.approx(1.0)
    assert sched.lr_at(100) == 0.0
    from_config = LRScheduler(LRScheduleConfig(lr=2.0, train_iters=100))
    assert from_config.lr_at(50) == pytest.approx(1.0)


def test_warmup_fraction_is_a_share_of_the_decay_iterations():
    sched = scheduler(lr=1.0, warmup_fraction=0.1, decay_style="cosine", train_iters=200)
    assert sched.config.warmup_iters == 20
    assert sched.lr_at(10) == pytest.approx(0.5)


def test_step_sets_every_group_with_lr_mult():
    weights = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [weights[0]]}, {"params": [weights[1]], "lr_mult": 0.1}], lr=123.0)
    sched = scheduler(lr=1.0, warmup_iters=10, decay_iters=20)
    assert sched.step(optimizer, 5) == pytest.approx(0.5)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.5, 0.05])
    assert (sched.last_iteration, sched.last_lr) == (5, 0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.01, min_lr=0.1), r"--min-lr \(0.1\) must not exceed --lr \(0.01\)"),
        (dict(lr=-1.0), "--lr must be a finite number >= 0"),
        (dict(lr=float("nan")), "--lr must be a finite number"),
        (dict(lr=1.0, min_lr=-0.1), "--min-lr must be a finite number >= 0"),
        (dict(lr=1.0, warmup_iters=-1), "--lr-warmup-iters must be >= 0"),
        (dict(lr=1.0, decay_iters=0), "--lr-decay-iters must be >= 1"),
        (dict(lr=1.0, train_iters=0), "--train-iters must be >= 1"),
        (dict(lr=1.0, decay_style="step"), "--lr-decay-style 'step': choose one of constant, linear, cosine"),
        (dict(lr=1.0, warmup_iters=20, decay_iters=10), r"--lr-warmup-iters \(20\) must not exceed --lr-decay-iters \(10\)"),
        (dict(lr=1.0, warmup_fraction=1.5), r"--lr-warmup-fraction must be in \[0, 1\]"),
        (dict(lr=1.0, warmup_fraction=0.1, warmup_iters=5), "pass only one"),
        (dict(lr=1.0, decay_style="WSD"), "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
        (dict(lr=1.0, decay_style="WSD", wsd_decay_iters=50, decay_iters=40), "--lr-wsd-decay-iters \\(50\\) must fit"),
        (dict(lr=1.0, wsd_decay_style="step"), "--lr-wsd-decay-style 'step'"),
    ],
)
def test_config_rejects_bad_flags_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRScheduleConfig(**kwargs)


def test_scheduler_needs_decay_or_train_iters():
    with pytest.raises(ValueError, match="needs --lr-decay-iters or --train-iters"):
        LRScheduler(LRScheduleConfig(lr=1.0))
    with pytest.raises(ValueError, match=r"--lr-warmup-iters \(50\) must not exceed --lr-decay-iters \(40\)"):
        LRScheduler(LRScheduleConfig(lr=1.0, warmup_iters=50), train_iters=40)
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        scheduler(lr=1.0, train_iters=10).lr_at(-1)


def test_state_round_trip_through_torch_save(tmp_path):
    sched = scheduler(lr=1.0, min_lr=0.1, warmup_iters=10, decay_style="cosine", train_iters=110)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched.step(optimizer, 60)
    torch.save(sched.state_dict(), tmp_path / "sched.pt")
    state = torch.load(tmp_path / "sched.pt", weights_only=True)
    assert state["decay_iters"] == 110 and state["last_iteration"] == 60

    resumed = scheduler(lr=1.0, min_lr=0.1, warmup_iters=10, decay_style="cosine", decay_iters=110)
    resumed.load_state_dict(state)
    assert (resumed.last_iteration, resumed.last_lr) == (60, pytest.approx(0.55))
    assert [resumed.lr_at(i) for i in range(0, 120, 7)] == [sched.lr_at(i) for i in range(0, 120, 7)]


def test_load_with_a_changed_schedule():
    state = scheduler(lr=1.0, warmup_iters=10, train_iters=100).state_dict()
    changed = scheduler(lr=2.0, warmup_iters=10, train_iters=200)
    with pytest.raises(ValueError, match=r"--lr 1.0 -> 2.0, --lr-decay-iters 100 -> 200.*--override-opt-param-scheduler"):
        changed.load_state_dict(state)
    changed.load_state_dict(state, on_mismatch="override")
    assert changed.lr_at(10) == 2.0
    changed.load_state_dict(state, on_mismatch="use_checkpoint")
    assert (changed.lr_at(10), changed.config.total_decay_iters) == (1.0, 100)
    with pytest.raises(ValueError, match="on_mismatch 'ignore'"):
        changed.load_state_dict(state, on_mismatch="ignore")


def schedule_args(argv: str) -> ScheduleArgs:
    parser = argparse.ArgumentParser()
    ScheduleArgs.add_to(parser)
    return ScheduleArgs.from_namespace(parser.parse_args(argv.split()))


def test_flags_fill_the_config():
    args = schedule_args("--lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 5")
    config = args.lr_schedule_config(train_iters=50)
    assert (config.lr, config.min_lr, config.decay_style, config.warmup_iters, config.total_decay_iters) == (
        3e-4, 3e-5, "cosine", 5, 50)
    with pytest.raises(ValueError, match="--lr is required"):
        schedule_args("").lr_schedule_config(train_iters=50)


def test_resume_flags_choose_the_mismatch_policy():
    assert schedule_args("").mismatch_policy == "error"
    assert schedule_args("--override-opt-param-scheduler").mismatch_policy == "override"
    assert schedule_args("--use-checkpoint-opt-param-scheduler").mismatch_policy == "use_checkpoint"
    with pytest.raises(ValueError, match="contradict each other"):
        schedule_args("--override-opt-param-scheduler --use-checkpoint-opt-param-scheduler")


def test_sample_based_schedule_counts_samples_and_names_its_flags():
    sched = LRScheduler(LRScheduleConfig(lr=1.0, min_lr=0.1, warmup_iters=100, decay_style="linear", train_iters=1100,
                                         unit="samples"))
    assert [sched.lr_at(s) for s in (0, 50, 100, 600, 1100, 5000)] == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])
    for kwargs, message in [
        (dict(warmup_iters=-1), "--lr-warmup-samples must be >= 0"),
        (dict(decay_iters=0), "--lr-decay-samples must be >= 1"),
        (dict(warmup_iters=50, decay_iters=40), r"--lr-warmup-samples \(50\) must not exceed --lr-decay-samples \(40\)"),
        (dict(decay_style="WSD"), "needs --lr-wsd-decay-samples"),
        (dict(warmup_fraction=0.1, warmup_iters=5), "--lr-warmup-fraction and --lr-warmup-samples both given"),
    ]:
        with pytest.raises(ValueError, match=message):
            LRScheduleConfig(lr=1.0, unit="samples", **kwargs)


def test_position_advances_with_applied_updates_only_and_is_saved():
    sched = scheduler(lr=1.0, warmup_iters=10, decay_iters=20)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for applied in (True, False, True, True):  # the second update is skipped (non-finite gradients)
        sched.step(optimizer)
        if applied:
            sched.advance(1)
    assert sched.num_steps == 3 and sched.last_iteration == 2 and sched.last_lr == pytest.approx(0.2)
    state = sched.state_dict()
    assert state["num_steps"] == 3 and state["unit"] == "iterations"
    resumed = scheduler(lr=1.0, warmup_iters=10, decay_iters=20)
    resumed.load_state_dict(state)
    assert resumed.num_steps == 3 and resumed.step(optimizer) == pytest.approx(0.3)
    # a checkpoint from before the position was kept: every iteration up to the saved one counted
    old = {key: value for key, value in state.items() if key not in ("num_steps", "unit")}
    resumed.load_state_dict(dict(old, last_iteration=6))
    assert resumed.num_steps == 7


def test_iteration_flags_in_samples_for_a_ramped_batch():
    # Megatron-LM: warm-up and decay steps are iterations x the (final) global batch, or the
    # warm-up fraction of the decay samples.
    args = schedule_args("--lr 1.0 --lr-warmup-fraction 0.01 --lr-decay-iters 430 --lr-wsd-decay-iters 40 "
                         "--lr-decay-style WSD")
    config = args.lr_schedule_config(train_iters=500, samples_per_iteration=1536)
    assert (config.unit, config.decay_iters, config.warmup_iters, config.wsd_decay_iters, config.train_iters) == (
        "samples", 430 * 1536, int(0.01 * 430 * 1536), 40 * 1536, 500 * 1536)
    samples = schedule_args("--lr 1.0 --lr-warmup-samples 64 --lr-decay-samples 640").lr_schedule_config(
        None, train_samples=1000)
    assert (samples.unit, samples.warmup_iters, samples.total_decay_iters) == ("samples", 64, 640)
    assert LRScheduler(samples).lr_at(32) == pytest.approx(0.5)
