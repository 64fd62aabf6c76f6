"""AdamW over FP32 master weights, with global-norm clipping and skip-on-overflow.

Model parameters may be BF16 (`--bf16`) or FP32. BF16 parameters get FP32 master copies that the
optimizer updates and copies back; FP32 parameters are their own masters (Megatron's
Float16OptimizerWithFloat16Params / FP32Optimizer). Gradients are read through ``grad_of``, in the
trainer `DistributedDataParallel.dense_grad` (its FP32 buffers).

Every optimizer here follows one protocol (`Optimizer`): ``step() -> StepResult``; as a part of a
`ChainedOptimizer`, ``grad_norm_squared()`` and ``apply(coefficient)`` (clip by the chain's
coefficient and update); ``param_groups`` (the LR schedule sets ``lr``); the bytes it holds; and
``local_state`` / ``load_local_state`` / ``step_count`` for checkpoints. A model whose weights need
different optimizers (FP8 weights with FP8AdamW, the rest with AdamW) gets one part per kind,
chained: one global gradient norm, one clipping coefficient, one skip decision.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.layout import ParamLayouts


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self):
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"--adam-eps must be positive, got {self.adam_eps}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("--weight-decay and --clip-grad must be >= 0 (0 turns clipping off)")


@dataclass
class StepResult:
    skipped: bool
    grad_norm: float


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # Megatron's default: biases and norm weights (every 1-D parameter) are not decayed.
    return param.ndim < 2 or name.endswith(".bias")


def global_grad_norm(params: list[nn.Parameter], grads: list[torch.Tensor], ps: ParallelState,
                     layouts: ParamLayouts, extra_square_sum: torch.Tensor | None = None) -> float:
    """L2 norm of the whole model's gradient: each tensor-parallel shard counts once, replicated
    parameters once per model (on tensor-parallel rank 0), the tied output weight of the last
    pipeline stage not at all (the first stage counts it), summed over the tp and pp groups.
    `extra_square_sum`: this rank's sum of squares of gradients kept elsewhere (FP8 ones)."""
    total = global_grad_square_sum(params, grads, ps, layouts, extra_square_sum)
    return norm_from_squares(total.item())  # one read of the device: one sync


def global_grad_square_sum(params: list[nn.Parameter], grads: list[torch.Tensor], ps: ParallelState,
                           layouts: ParamLayouts, extra_square_sum: torch.Tensor | None = None) -> torch.Tensor:
    """`global_grad_norm`'s sum of squares, a float32 0-dim tensor left on the device."""
    counted = [g for p, g in zip(params, grads) if layouts[p].counts_in_norm(ps.tp_rank)]
    device = grads[0].device if grads else ps.device
    total = torch.zeros((), dtype=torch.float32, device=device)
    if counted:
        norms = torch._foreach_norm([g.float() for g in counted])
        total = torch.stack(norms).square().sum()
    if extra_square_sum is not None:
        total = total + extra_square_sum.to(total.device)
    for group in ("tp", "pp"):
        if ps.group_size(group) > 1:
            comm.all_reduce(total, ps, group)
    return total


def clip_coefficient(clip_grad: float, norm: float) -> float:
    """What to multiply gradients by so that their global norm is at most `clip_grad` (0: off)."""
    return clip_grad / (norm + 1e-6) if clip_grad > 0 and norm > clip_grad else 1.0


def norm_from_squares(squared: float) -> float:
    return math.sqrt(squared) if math.isfinite(squared) else math.inf


class Optimizer(ABC):
    """The protocol's defaults. A part computes its own norm (`grad_norm`) and applies a
    coefficient (`apply`); alone, it steps with its own norm, clip and skip (`step`)."""

    config: OptimizerConfig
    publish_dp_bytes: int = 0  # data-parallel bytes the last step sent to publish updated weights

    @abstractmethod
    def grad_norm(self) -> float:
        """The global gradient norm of this part's parameters."""

    def grad_norm_squared(self) -> float:
        """This part's share of the global squared norm (summed over the groups it spans)."""
        return self.grad_norm() ** 2

    def grad_norm_squared_tensor(self) -> torch.Tensor:
        """`grad_norm_squared` as a float64 0-dim tensor, left on the device where the part can (a
        chain adds its parts' there and reads the total once: one host sync per step)."""
        return torch.tensor(self.grad_norm_squared(), dtype=torch.float64)

    @abstractmethod
    def apply(self, coefficient: float) -> None:
        """Multiply the gradients by the clipping `coefficient` and update the parameters."""

    def step(self) -> StepResult:
        """The global norm; a non-finite one skips the step; else clip and update."""
        norm = self.grad_norm()
        self.publish_dp_bytes = 0
        if not math.isfinite(norm):
            return StepResult(skipped=True, grad_norm=norm)
        self.apply(clip_coefficient(self.config.clip_grad, norm))
        return StepResult(skipped=False, grad_norm=norm)

    def fp8_state_bytes(self) -> int:
        """Masters and moments of FP8 weights held here (the weights themselves excluded)."""
        return 0


class ChainedOptimizer(Optimizer):
    """Optimizers over disjoint parameters stepped as one (Megatron-Core's ChainedOptimizer): the
    global norm sums the parts' squares in order; a non-finite norm skips every part; otherwise
    every part applies the same clipping coefficient, in order."""

    def __init__(self, parts: list[Optimizer], config: OptimizerConfig):
        self.parts, self.config = list(parts), config

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    def grad_norm_squared(self) -> float:
        return self.grad_norm_squared_tensor().item()

    def grad_norm_squared_tensor(self) -> torch.Tensor:
        """The parts' squares added in order in float64 (the bits of a sum of Python floats)."""
        total = None
        for part in self.parts:
            square = part.grad_norm_squared_tensor()
            total = square if total is None else total + square  # 0-dim: any two devices add
        return total if total is not None else torch.zeros((), dtype=torch.float64)

    def grad_norm(self) -> float:
        return norm_from_squares(self.grad_norm_squared())

    def apply(self, coefficient: float) -> None:
        for part in self.parts:
            part.apply(coefficient)
            self.publish_dp_bytes += part.publish_dp_bytes

    def master_bytes(self) -> int:
        return sum(part.master_bytes() for part in self.parts)

    def optim_bytes(self) -> int:
        return sum(part.optim_bytes() for part in self.parts)

    def fp8_state_bytes(self) -> int:
        return sum(part.fp8_state_bytes() for part in self.parts)

    def step_count(self) -> int:
        return max(part.step_count() for part in self.parts)

    def local_state(self) -> dict[nn.Parameter, dict]:
        return {param: entry for part in self.parts for param, entry in part.local_state().items()}

    def load_local_state(self, full_states: dict[nn.Parameter, dict[str, torch.Tensor]], step: int) -> None:
        for part in self.parts:
            part.load_local_state(full_states, step)


class MixedPrecisionOptimizer(Optimizer):
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], config: OptimizerConfig, ps: ParallelState,
                 grad_of: Callable[[nn.Parameter], torch.Tensor] | None = None, layouts: ParamLayouts | None = None):
        """`grad_of(param)`: where each parameter's gradient is (a data-parallel wrapper's
        `dense_grad`); without one, ``param.grad``. `layouts`: how parameters are split over
        tensor-parallel ranks (the wrapper's `layouts`); without, all are replicated."""
        self.config, self.ps = config, ps
        self.layouts = layouts if layouts is not None else ParamLayouts()
        self.grad_of = grad_of if grad_of is not None else (lambda p: p.grad)
        self.params = [p for _, p in named_params]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        decay, no_decay = [], []
        for (name, param), master in zip(named_params, self.masters):
            (no_decay if _no_weight_decay(name, param) else decay).append(master)
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                                           betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def grads(self) -> list[torch.Tensor]:
        return [self.grad_of(p) for p in self.params]

    def step(self) -> StepResult:
        grads = self.grads()
        norm = global_grad_norm(self.params, grads, self.ps, self.layouts)
        if not math.isfinite(norm):
            return StepResult(skipped=True, grad_norm=norm)
        self.update(grads, clip_coefficient(self.config.clip_grad, norm))
        return StepResult(skipped=False, grad_norm=norm)

    def grad_norm(self) -> float:
        return global_grad_norm(self.params, self.grads(), self.ps, self.layouts)

    def grad_norm_squared(self) -> float:
        return self.grad_norm_squared_tensor().item()

    def grad_norm_squared_tensor(self) -> torch.Tensor:
        # The sum of squares itself (not the norm squared again, which rounded it through a sqrt),
        # a non-finite one as inf; on the device.
        total = global_grad_square_sum(self.params, self.grads(), self.ps, self.layouts).double()
        return torch.where(torch.isfinite(total), total, math.inf)

    def apply(self, coefficient: float) -> None:
        self.update(self.grads(), coefficient)

    def update(self, grads: list[torch.Tensor], coefficient: float) -> None:
        """Scale the gradients by the clipping `coefficient` and take the AdamW step."""
        if coefficient < 1.0 and grads:
            torch._foreach_mul_(grads, coefficient)
        for master, grad in zip(self.masters, grads):
            master.grad = grad if grad.dtype == master.dtype else grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.params, self.masters):
                master.grad = None
                if param is not master:
                    param.copy_(master)

    # ----- memory accounting (bytes this rank holds) -------------------------------------------
    def master_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for p, m in zip(self.params, self.masters) if m is not p)

    def optim_bytes(self) -> int:
        total = 0
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for k, v in state.items()
                         if torch.is_tensor(v) and k != "step")
        return total

    # ----- checkpoints: per-parameter state, independent of how the optimizer stores it --------
    def step_count(self) -> int:
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    def local_state(self) -> dict[nn.Parameter, dict]:
        """Per parameter: the range of its flattened (tensor-parallel) shard this rank updates
        (all of it here), its FP32 master and Adam moments over that range."""
        out = {}
        for param, master in zip(self.params, self.masters):
            entry = {"range": (0, param.numel()), "master": master.detach().reshape(-1).float()}
            state = self.optimizer.state.get(master, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    entry[key] = state[key].reshape(-1)
            out[param] = entry
        return out

    def load_local_state(self, full_states: dict[nn.Parameter, dict[str, torch.Tensor]], step: int) -> None:
        """Install masters and moments given as whole shards shaped like each parameter."""
        with torch.no_grad():
            for param, master in zip(self.params, self.masters):
                given = full_states.get(param)
                if given is None:
                    continue
                if "master" in given:
                    master.copy_(given["master"].view_as(master))
                    if param is not master:
                        param.copy_(master)
                if "exp_avg" in given and "exp_avg_sq" in given:
                    self.optimizer.state[master] = {
                        "step": torch.tensor(float(step)),
                        "exp_avg": given["exp_avg"].to(master.dtype).view_as(master).clone(),
                        "exp_avg_sq": given["exp_avg_sq"].to(master.dtype).view_as(master).clone(),
                    }
