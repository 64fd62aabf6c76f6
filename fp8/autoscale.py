"""Automatic scaling of FP8 gradients before their reduction (FP8-LM, section 2.1).

Summing N ranks' FP8 gradients that share one scale can overflow the format (post-scaling);
dividing by N first underflows (pre-scaling). The paper scales the gradients by a factor mu
before the sum and adapts it: when the fraction of reduced values that reach the FP8 maximum
exceeds a threshold (default 1e-5, i.e. 0.001%), mu halves for the next step; after `window`
consecutive steps below it (default 1000), mu doubles again, up to `max_mu` (default 2) -
exponential growth, as a loss scaler's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GradientAutoScaler:
    ratio: float = 1e-5
    window: int = 1000
    init_mu: float = 1.0
    max_mu: float = 2.0
    min_mu: float = 2.0**-32

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"--fp8-wgrad-auto-scaling-ratio must be in [0, 1), got {self.ratio}")
        if self.window < 1:
            raise ValueError(f"--fp8-wgrad-auto-scaling-window must be >= 1, got {self.window}")
        if not 0 < self.min_mu <= self.init_mu <= self.max_mu:
            raise ValueError(f"need 0 < min_mu <= init_mu <= max_mu, got {self.min_mu}, {self.init_mu}, {self.max_mu}")
        self.mu = self.init_mu
        self.steps_below = 0

    def update(self, overflow_frac: float) -> float:
        """Record one reduction's overflow fraction; returns mu for the next step."""
        if not overflow_frac <= self.ratio:  # NaN counts as overflow
            self.mu = max(self.mu / 2, self.min_mu)
            self.steps_below = 0
        else:
            self.steps_below += 1
            if self.steps_below >= self.window:
                self.mu = min(self.mu * 2, self.max_mu)
                self.steps_below = 0
        return self.mu

    def state_dict(self) -> dict:
        return {"mu": self.mu, "steps_below": self.steps_below}

    def load_state_dict(self, state: dict) -> None:
        self.mu = float(state["mu"])
        self.steps_below = int(state["steps_below"])
