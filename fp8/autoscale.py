"""Automatic scaling of FP8 gradients before their reduction (FP8-LM, section 2.1).

Summing N ranks' FP8 gradients that share one scale can overflow the format (post-scaling);
dividing by N first underflows (pre-scaling). The paper multiplies the gradients by a factor mu
before the sum and adapts it from one statistic: the fraction of mu-scaled gradient values that
saturate at the FP8 maximum, at the cast before the sum or in the sum
(`fp8.collectives.ReductionStats.overflow_frac`, measured at every data-parallel size, 1
included). When that fraction exceeds `ratio` (default 1e-5 = 0.001%), mu halves for the next
step. While it stays at or below, mu grows by a constant factor each step, chosen at the last
halving (or at the start) so that mu reaches `max_mu` (2) after `window` clean steps (default
1000): an exponential climb back, not a jump.
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
        self._restart_climb()

    def _restart_climb(self) -> None:
        """From here, mu climbs geometrically from its current value to `max_mu` in `window` steps."""
        self.climb_from, self.clean_steps = self.mu, 0

    def update(self, overflow_frac: float) -> float:
        """Record one reduction's saturated fraction; returns mu for the next step."""
        if not overflow_frac <= self.ratio:  # NaN counts as overflow
            self.mu = max(self.mu / 2, self.min_mu)
            self._restart_climb()
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.window:
                self.mu = self.max_mu
            else:
                self.mu = self.climb_from * (self.max_mu / self.climb_from) ** (self.clean_steps / self.window)
        return self.mu

    def state_dict(self) -> dict:
        return {"mu": self.mu, "climb_from": self.climb_from, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.mu = float(state["mu"])
        if "climb_from" in state:
            self.climb_from, self.clean_steps = float(state["climb_from"]), int(state["clean_steps"])
        else:  # a checkpoint of the earlier rule (doubling after a clean window): climb from here
            self._restart_climb()
