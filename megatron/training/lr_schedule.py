"""Learning-rate schedule: linear warm-up, then decay to `--min-lr`, as Megatron-LM does it.

The learning rate is a pure function of the schedule's position (`LRScheduler.lr_at`), so a test
can check any point without stepping. The position counts what the applied updates consumed, as
Megatron-LM's scheduler counts it: updates (`unit` "iterations", the iteration flags) or samples
(`unit` "samples": `--train-samples` with `--lr-warmup-samples`, `--lr-decay-samples`,
`--lr-wsd-decay-samples`; and every schedule of a run whose batch ramps up, the iteration flags
converted at the final `--global-batch-size`). A skipped update (non-finite gradients) does not
advance it; the trainer calls `advance` after each applied one, and checkpoints keep the position.
Below, `i` is the position and the counts are in the schedule's unit.

    lr_at(i) = lr * i / warmup_iters                       for i <= warmup_iters
             = min_lr + (lr - min_lr) * coeff(i)           for warmup_iters < i <= decay_iters
             = min_lr                                      for i > decay_iters

with `coeff` falling from 1 to 0 over the decay window according to `--lr-decay-style`:
linear `1 - r`, cosine `(1 + cos(pi r)) / 2` with `r = (i - warmup) / (decay - warmup)`;
`constant` keeps `lr` for ever; `inverse-square-root` is `lr * sqrt(max(warmup, 1) / i)`, floored at
`min_lr`; `WSD` (warm-up, stable, decay) holds `lr` until the last `--lr-wsd-decay-iters`
iterations of the decay window and anneals in them with `--lr-wsd-decay-style`.
Megatron starts the warm-up at 0, so with warm-up the first update (iteration 0) has lr 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
MISMATCH_POLICIES = ("error", "override", "use_checkpoint")
UNITS = ("iterations", "samples")

# Config fields that define the curve; a checkpoint records them so a resume can notice a change.
_SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_iters", "decay_iters", "decay_style", "wsd_decay_iters",
                    "wsd_decay_style", "unit")
_FLAG_OF_FIELD = {"lr": "--lr", "min_lr": "--min-lr", "warmup_iters": "--lr-warmup-iters",
                  "decay_iters": "--lr-decay-iters", "decay_style": "--lr-decay-style",
                  "wsd_decay_iters": "--lr-wsd-decay-iters", "wsd_decay_style": "--lr-wsd-decay-style",
                  "train_iters": "--train-iters", "unit": "the schedule's unit (--train-iters or --train-samples)"}
_SAMPLE_FLAGS = {"warmup_iters": "--lr-warmup-samples", "decay_iters": "--lr-decay-samples",
                 "wsd_decay_iters": "--lr-wsd-decay-samples", "train_iters": "--train-samples"}


@dataclass(kw_only=True)
class LRScheduleConfig:
    """The schedule's flags. `decay_iters` None means `train_iters` (Megatron's default). The
    counts (`warmup_iters`, `decay_iters`, `wsd_decay_iters`, `train_iters`) are in `unit`s:
    iterations, or samples for a sample-based schedule."""

    lr: float
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_fraction: float | None = None  # of the decay iterations; instead of warmup_iters
    decay_iters: int | None = None
    decay_style: str = "linear"
    wsd_decay_iters: int | None = None
    wsd_decay_style: str = "exponential"
    train_iters: int | None = None
    unit: str = "iterations"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"schedule unit {self.unit!r}: use one of {', '.join(UNITS)}")
        self._check_rates()
        self._check_iteration_counts()
        self._check_styles()
        if self.warmup_fraction is not None:
            self._resolve_warmup_fraction()
        total = self._known_total_decay_iters()
        if total is not None and self.decay_style != "constant" and self.warmup_iters > total:
            raise ValueError(f"{self.flag('warmup_iters')} ({self.warmup_iters}) must not exceed "
                             f"{self.flag('decay_iters')} ({total}); shorten the warm-up or decay over more {self.unit}")
        if self.decay_style == "WSD" and total is not None and self.wsd_decay_iters > total - self.warmup_iters:
            raise ValueError(f"{self.flag('wsd_decay_iters')} ({self.wsd_decay_iters}) must fit in the decay window "
                             f"after warm-up ({total - self.warmup_iters} {self.unit})")

    def flag(self, name: str) -> str:
        """The flag that sets field `name` in this schedule's unit."""
        if self.unit == "samples" and name in _SAMPLE_FLAGS:
            return _SAMPLE_FLAGS[name]
        return _FLAG_OF_FIELD[name]

    def _check_rates(self) -> None:
        if not math.isfinite(self.lr) or self.lr < 0:
            raise ValueError(f"--lr must be a finite number >= 0, got {self.lr}")
        if not math.isfinite(self.min_lr) or self.min_lr < 0:
            raise ValueError(f"--min-lr must be a finite number >= 0, got {self.min_lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")

    def _check_iteration_counts(self) -> None:
        if self.warmup_iters < 0:
            raise ValueError(f"{self.flag('warmup_iters')} must be >= 0, got {self.warmup_iters}")
        if self.decay_iters is not None and self.decay_iters < 1:
            raise ValueError(f"{self.flag('decay_iters')} must be >= 1, got {self.decay_iters}; omit it to decay over "
                             f"{self.flag('train_iters')}")
        if self.train_iters is not None and self.train_iters < 1:
            raise ValueError(f"{self.flag('train_iters')} must be >= 1, got {self.train_iters}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.warmup_fraction is not None and self.warmup_iters:
            raise ValueError(f"--lr-warmup-fraction and {self.flag('warmup_iters')} both given; pass only one")

    def _check_styles(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.decay_style!r}: choose one of {', '.join(DECAY_STYLES)}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"--lr-wsd-decay-style {self.wsd_decay_style!r}: choose one of "
                             f"{', '.join(WSD_DECAY_STYLES)}")
        if self.decay_style == "WSD" and self.wsd_decay_iters is None:
            raise ValueError(f"--lr-decay-style WSD needs {self.flag('wsd_decay_iters')} (the length of the final "
                             "anneal)")
        if self.wsd_decay_iters is not None and self.wsd_decay_iters < 1:
            raise ValueError(f"{self.flag('wsd_decay_iters')} must be >= 1, got {self.wsd_decay_iters}")

    def _resolve_warmup_fraction(self) -> None:
        # Megatron turns the fraction into iterations once; keeping only warmup_iters afterwards
        # means a checkpoint compares like with like.
        total = self._known_total_decay_iters()
        if total is None:
            return  # resolved when the scheduler learns train_iters
        self.warmup_iters = int(self.warmup_fraction * total)
        self.warmup_fraction = None

    def _known_total_decay_iters(self) -> int | None:
        return self.decay_iters if self.decay_iters is not None else self.train_iters

    @property
    def total_decay_iters(self) -> int:
        """The iteration at which the learning rate reaches `min_lr`."""
        if self.decay_iters is not None:
            return self.decay_iters
        if self.train_iters is None:
            raise ValueError(f"the learning-rate schedule needs {self.flag('decay_iters')} or {self.flag('train_iters')}")
        return self.train_iters


class LRScheduler:
    """Sets the optimizer's learning rate from `LRScheduleConfig`; see the module docstring.

    `train_iters` fills in `config.train_iters` where the config was built without it.
    A param group with an `lr_mult` key gets `lr_at(iteration) * lr_mult` (Megatron's convention,
    e.g. a smaller rate for embeddings).
    """

    def __init__(self, config: LRScheduleConfig, *, train_iters: int | None = None, on_mismatch: str = "error"):
        """`on_mismatch`: what `load_state_dict` does where a checkpoint's schedule differs (below)."""
        if train_iters is not None and config.train_iters != train_iters:
            config = dataclasses.replace(config, train_iters=train_iters)
        config.total_decay_iters  # noqa: B018 -- fail now, not at the first step, when neither is known
        self.config, self.on_mismatch = config, on_mismatch
        self.num_steps = 0  # the position: what the applied updates consumed, in the config's unit
        self.last_iteration: int | None = None  # the position the last `step` set the rate for
        self.last_lr: float | None = None

    def lr_at(self, iteration: int) -> float:
        """The base learning rate (before any `lr_mult`) at position `iteration` (an iteration, or
        a sample count for a sample-based schedule)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        cfg = self.config
        if cfg.warmup_iters > 0 and iteration <= cfg.warmup_iters:
            return cfg.lr * iteration / cfg.warmup_iters
        if cfg.decay_style == "constant":
            return cfg.lr
        if iteration > cfg.total_decay_iters:
            return cfg.min_lr
        if cfg.decay_style == "inverse-square-root":
            return max(cfg.min_lr, cfg.lr * math.sqrt(max(cfg.warmup_iters, 1) / max(iteration, 1)))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * self._decay_coefficient(iteration)

    def _decay_coefficient(self, iteration: int) -> float:
        cfg = self.config
        window = cfg.total_decay_iters - cfg.warmup_iters
        progress = (iteration - cfg.warmup_iters) / window if window > 0 else 1.0
        if cfg.decay_style == "linear":
            return 1.0 - progress
        if cfg.decay_style == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        assert cfg.decay_style == "WSD", cfg.decay_style
        anneal_start = cfg.total_decay_iters - cfg.wsd_decay_iters
        if iteration <= anneal_start:
            return 1.0
        return _anneal_coefficient(cfg.wsd_decay_style, (iteration - anneal_start) / cfg.wsd_decay_iters)

    def step(self, optimizer, iteration: int | None = None) -> float:
        """Set every param group's lr for the update at position `iteration` (default: the
        position the applied updates have reached, `num_steps`); returns the base lr."""
        iteration = self.num_steps if iteration is None else iteration
        base_lr = self.lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = base_lr * group.get("lr_mult", 1.0)
        self.last_iteration, self.last_lr = iteration, base_lr
        return base_lr

    def advance(self, increment: int) -> None:
        """An update was applied: move the position on by what it consumed (1 iteration, or its
        global batch in samples). Skipped updates do not call it (Megatron-LM's rule)."""
        assert increment >= 0, increment
        self.num_steps += increment

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only, so `torch.load(weights_only=True)` reads it back."""
        state = {name: getattr(self.config, name) for name in _SCHEDULE_FIELDS}
        state["decay_iters"] = self.config.total_decay_iters
        state["last_iteration"] = self.last_iteration
        state["num_steps"] = self.num_steps
        return state

    def load_state_dict(self, state: dict[str, Any], *, on_mismatch: str | None = None) -> None:
        """Restore from a checkpoint. Where the checkpoint's schedule differs from this run's:

        `"error"` raises ValueError naming the flags (Megatron's default), `"override"` keeps this
        run's values (Megatron's --override-opt-param-scheduler), `"use_checkpoint"` adopts the
        checkpoint's (--use-checkpoint-opt-param-scheduler).
        """
        on_mismatch = on_mismatch or self.on_mismatch
        if on_mismatch not in MISMATCH_POLICIES:
            raise ValueError(f"on_mismatch {on_mismatch!r}: choose one of {', '.join(MISMATCH_POLICIES)}")
        current = self.state_dict()
        changed = [name for name in _SCHEDULE_FIELDS if name in state and state[name] != current[name]]
        if changed and on_mismatch == "error":
            details = ", ".join(f"{self.config.flag(n)} {state[n]} -> {current[n]}" for n in changed)
            raise ValueError(f"the checkpoint's learning-rate schedule differs from this run ({details}); "
                             "pass the checkpoint's values, or allow the change with --override-opt-param-scheduler "
                             "(or take the checkpoint's with --use-checkpoint-opt-param-scheduler)")
        if changed and on_mismatch == "use_checkpoint":
            self.config = dataclasses.replace(self.config, **{name: state[name] for name in changed})
        self.last_iteration = state.get("last_iteration")
        self.last_lr = None if self.last_iteration is None else self.lr_at(self.last_iteration)
        if "num_steps" in state:
            self.num_steps = int(state["num_steps"])
        else:  # written before the position was kept: every iteration up to the saved one advanced it
            self.num_steps = 0 if self.last_iteration is None else self.last_iteration + 1


def _anneal_coefficient(style: str, progress: float) -> float:
    """WSD's final anneal, from 1 at progress 0 to 0 at progress 1."""
    if style == "linear":
        return 1.0 - progress
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "exponential":
        return 2.0 * 0.5 ** progress - 1.0
    assert style == "minus_sqrt", style
    return 1.0 - math.sqrt(progress)
