"""The optimizer of levels O1 and O2: FP8 weight gradients, FP16 masters with scales.

The transformer linear weights (parameters marked ``grad_is_fp8``) are their own masters, FP16
with a per-tensor scale, and get their gradient as an FP8 `ScalingTensor` (``param.grad_fp8``,
already averaged over data parallel in FP8). `fp8.optim.FP8AdamW` updates them with Adam moments
in FP32 (O1) or FP8 / FP16 (O2, precision decoupling). Every other parameter goes through
`MixedPrecisionOptimizer` as at level none. The two share one global gradient norm, one clipping
coefficient and one skip decision: a non-finite gradient anywhere skips the step everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fp8.optim import FP8AdamW, scaled_value
from megatron.core.optimizer import (
    MixedPrecisionOptimizer, OptimizerConfig, StepResult, clip_coefficient, global_grad_norm,
)
from megatron.core.parallel_state import ParallelState


def _fp8_square_sum(params: list[nn.Parameter], device) -> torch.Tensor:
    """Sum of squares of the FP8 gradients, accumulated in FP32 (they are all tensor-parallel
    shards or replicated only across data parallel, so each counts once)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param in params:
        total = total + param.grad_fp8.dequantize(torch.float32).square().sum()
    return total


class FP8MixedPrecisionOptimizer:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], config: OptimizerConfig, ps: ParallelState,
                 *, exp_avg_dtype: str, exp_avg_sq_dtype: str, stochastic_rounding: bool = False, seed: int = 0):
        self.config, self.ps = config, ps
        dense = [(n, p) for n, p in named_params if not getattr(p, "grad_is_fp8", False)]
        self.fp8_params = [p for _, p in named_params if getattr(p, "grad_is_fp8", False)]
        self.dense = MixedPrecisionOptimizer(dense, config, ps)
        self.fp8 = FP8AdamW(self.fp8_params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                            eps=config.adam_eps, weight_decay=config.weight_decay, exp_avg_dtype=exp_avg_dtype,
                            exp_avg_sq_dtype=exp_avg_sq_dtype, stochastic_rounding=stochastic_rounding,
                            seed=seed + 7919 * (ps.tp_rank + ps.tp_size * ps.pp_rank)) if self.fp8_params else None

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + (self.fp8.param_groups if self.fp8 is not None else [])

    def step(self) -> StepResult:
        grads = self.dense.grads()
        device = grads[0].device if grads else self.ps.device
        fp8_squares = _fp8_square_sum(self.fp8_params, device) if self.fp8_params else None
        norm = global_grad_norm(self.dense.params, grads, self.ps, extra_square_sum=fp8_squares)
        if not math.isfinite(norm):
            return StepResult(skipped=True, grad_norm=norm)
        coefficient = clip_coefficient(self.config.clip_grad, norm)
        self.dense.update(grads, coefficient)
        if self.fp8 is not None:
            for param in self.fp8_params:  # dividing the scale multiplies the value: exact
                param.grad_fp8.scale = param.grad_fp8.scale / coefficient
            self.fp8.step()
        return StepResult(skipped=False, grad_norm=norm)

    # ----- memory accounting ---------------------------------------------------------------------
    def master_bytes(self) -> int:
        return self.dense.master_bytes() + (self.fp8.master_bytes() if self.fp8 is not None else 0)

    def optim_bytes(self) -> int:
        return self.dense.optim_bytes() + (self.fp8.state_bytes() if self.fp8 is not None else 0)

    # ----- checkpoints -------------------------------------------------------------------------
    def step_count(self) -> int:
        counts = [self.dense.step_count()]
        if self.fp8 is not None:
            counts += [int(state.get("step", 0)) for state in self.fp8.state.values()]
        return max(counts)

    def local_state(self) -> dict[nn.Parameter, dict]:
        out = self.dense.local_state()
        for param in self.fp8_params:
            entry = {"range": (0, param.numel()), "master": scaled_value(param).reshape(-1)}
            entry.update({k: v.reshape(-1) for k, v in self.fp8.state_fp32(param).items()})
            out[param] = entry
        return out

    def load_local_state(self, full_states: dict[nn.Parameter, dict[str, torch.Tensor]], step: int) -> None:
        self.dense.load_local_state(full_states, step)
        for param in self.fp8_params:
            given = full_states.get(param)
            if given and "exp_avg" in given and "exp_avg_sq" in given:
                self.fp8.load_state_fp32(param, {"exp_avg": given["exp_avg"], "exp_avg_sq": given["exp_avg_sq"]}, step)
