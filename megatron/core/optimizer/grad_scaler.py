"""Loss scaling for FP16 training (`--fp16`), as Megatron-LM does it.

FP16 has 5 exponent bits: gradients below 2^-24 flush to zero. The loss is multiplied by a scale
before backward, so the gradients are too; the optimizer divides them again (in FP32, on the
masters' side) before clipping and the update. A dynamic scale (`--fp16` alone) starts at
`--initial-loss-scale` (2^32); a step whose gradients hold an inf or a NaN is skipped, and after
`--hysteresis` (2) such steps the scale halves (never below `--min-loss-scale`); after
`--loss-scale-window` (1000) clean steps in a row it doubles. `--loss-scale S` keeps S fixed (a
non-finite step is still skipped). Megatron-LM's `DynamicGradScaler` / `ConstantGradScaler`.

`LossScaledOptimizer` wraps any optimizer of the protocol (`megatron.core.optimizer.Optimizer`):
the global norm of the scaled gradients decides the skip on every rank alike; otherwise one
coefficient, clip / scale, unscales and clips in one multiplication (exact for a power-of-two
scale without clipping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.core.optimizer import Optimizer, StepResult, clip_coefficient


@dataclass(kw_only=True)
class LossScalerConfig:
    """The loss-scale flags; `constant_scale` set means --loss-scale (no dynamics)."""

    constant_scale: float | None = None
    initial_scale: float = 2.0 ** 32
    min_scale: float = 1.0
    growth_interval: int = 1000
    hysteresis: int = 2
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    def __post_init__(self) -> None:
        # Below 1 the unscaling would be a multiplication by more than 1, which the optimizers'
        # clipping path does not apply; no FP16 run needs it.
        for flag, value in (("--loss-scale", self.constant_scale), ("--initial-loss-scale", self.initial_scale),
                            ("--min-loss-scale", self.min_scale)):
            if value is not None and not (math.isfinite(value) and value >= 1.0):
                raise ValueError(f"{flag} must be a finite number >= 1, got {value}")
        if self.min_scale > self.initial_scale:
            raise ValueError(f"--min-loss-scale ({self.min_scale:g}) must not exceed --initial-loss-scale "
                             f"({self.initial_scale:g})")
        if self.growth_interval < 1 or self.hysteresis < 1:
            raise ValueError(f"--loss-scale-window and --hysteresis must be >= 1, got {self.growth_interval} and "
                             f"{self.hysteresis}")

    @property
    def dynamic(self) -> bool:
        return self.constant_scale is None


class LossScaler:
    """The current loss scale and its update rule; its state is plain Python values (checkpoints
    load it with `weights_only=True`), so a resumed run continues with the same scale and counters."""

    def __init__(self, config: LossScalerConfig):
        self.config = config
        self.scale = config.initial_scale if config.dynamic else config.constant_scale
        self.growth_tracker = 0  # clean steps in a row since the last overflow or growth
        self.hysteresis_tracker = config.hysteresis  # overflows left before the scale halves

    def update(self, found_inf: bool) -> None:
        """After a step: `found_inf` means its gradients were not finite (the step was skipped)."""
        cfg = self.config
        if not cfg.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * cfg.backoff_factor, cfg.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == cfg.growth_interval:
            self.growth_tracker = 0
            self.hysteresis_tracker = cfg.hysteresis
            self.scale *= cfg.growth_factor

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        if not self.config.dynamic:  # --loss-scale: the flag's value stands, as upstream's constant scaler
            return
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


class LossScaledOptimizer(Optimizer):
    """`inner` stepped on gradients of a loss multiplied by `scaler.scale` (see the module
    docstring). Everything else (param groups, bytes, checkpoint state) is the inner optimizer's."""

    def __init__(self, inner: Optimizer, scaler: LossScaler):
        self.inner, self.scaler, self.config = inner, scaler, inner.config

    @property
    def loss_scale(self) -> float:
        """What the next backward's loss is multiplied by."""
        return self.scaler.scale

    def step(self) -> StepResult:
        scale = self.scaler.scale
        scaled_norm = self.inner.grad_norm()
        found_inf = not math.isfinite(scaled_norm)
        self.scaler.update(found_inf)
        self.inner.publish_dp_bytes = 0
        if found_inf:
            return StepResult(skipped=True, grad_norm=scaled_norm)
        norm = scaled_norm / scale
        self.inner.apply(clip_coefficient(self.config.clip_grad, norm) / scale)
        return StepResult(skipped=False, grad_norm=norm)

    def grad_norm(self) -> float:
        return self.inner.grad_norm() / self.scaler.scale

    def apply(self, coefficient: float) -> None:
        self.inner.apply(coefficient / self.scaler.scale)

    @property
    def publish_dp_bytes(self) -> int:
        return self.inner.publish_dp_bytes

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def fp8_state_bytes(self) -> int:  # defined by the base class, so not reached through __getattr__
        return self.inner.fp8_state_bytes()

    def __getattr__(self, name: str):
        # master_bytes, optim_bytes, fp8_state_bytes, step_count, local_state, load_local_state, ...
        if name in ("inner", "scaler", "config"):
            raise AttributeError(name)
        return getattr(self.inner, name)
