"""The FP8 weights' part of the optimizer at levels O1 and O2: FP8 weight gradients, FP16 masters
with scales.

The transformer linear weights with FP8 gradients (`fp8_params`, from the precision plan) are their
own masters, FP16 with a per-tensor scale, and get their gradient as an FP8 `ScalingTensor` (from
the plan's `FP8GradStore`, already averaged over data parallel in FP8). `fp8.optim.FP8AdamW`
updates them with Adam moments in FP32 (O1) or FP8 / FP16 (O2, precision decoupling). Every other
parameter goes through the dense optimizer (`MixedPrecisionOptimizer`, or `DistributedOptimizer`
with ``--use-distributed-optimizer``); `factory.build_optimizer` chains the two parts
(`ChainedOptimizer`): one global gradient norm, one clipping coefficient and one skip decision.

With the distributed optimizer the FP8 weights are not split: each is given whole, with its
scale, to one data-parallel rank (`fp8.greedy_partition`, FP8-LM's Algorithm 1 - the ownership
model of FP8 ZeRO's `FP8ZeroLayout` at O3 as well), which alone keeps its Adam moments and
updates it; the owners then broadcast the new FP16 masters and scales.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from fp8.gradients import FP8GradStore
from fp8.optim import FP8AdamW, is_scaled_fp16, scaled_value
from fp8.zero import greedy_partition
from megatron.core.distributed import comm
from megatron.core.optimizer import Optimizer, OptimizerConfig, norm_from_squares
from megatron.core.parallel_state import ParallelState


def fp8_grad_square_sum(params: list[nn.Parameter], grads: FP8GradStore, ps: ParallelState,
                        owned: list[nn.Parameter] | None = None) -> torch.Tensor:
    """Sum of squares of the FP8 gradients over the model. After the FP8 all-reduce they are equal
    on every data-parallel rank and tensor-parallel shards otherwise, so sum over tp and pp. Under
    FP8 ZeRO only the `owned` gradients are here: each rank fills its tensors' entries of one
    per-tensor vector and the vector is summed over dp. The total is always summed in the model's
    tensor order, so it has the same bits whichever rank owns which tensor (O3 and O2 agree).
    A float64 0-dim tensor (the float32 sum, exactly), left on the device."""
    device = params[0].device if params else ps.device
    mine = None if owned is None else {id(p) for p in owned}
    zero = torch.zeros((), dtype=torch.float32, device=device)
    squares = torch.stack([grads.get(param).dequantize(torch.float32).square().sum()
                           if mine is None or id(param) in mine else zero for param in params] or [zero])
    if mine is not None and ps.dp_size > 1:
        comm.all_reduce(squares, ps, "dp")
    total = squares.sum()
    for group in ("tp", "pp"):
        if ps.group_size(group) > 1:
            comm.all_reduce(total, ps, group)
    return total.double()


def fp8_adamw(params: list[torch.Tensor], grads: FP8GradStore, config: OptimizerConfig, ps: ParallelState, *,
              exp_avg_dtype: str, exp_avg_sq_dtype: str, stochastic_rounding: bool, seed: int) -> FP8AdamW | None:
    """FP8AdamW over `params` (None when there are none). Replicas must round alike: the
    stochastic-rounding seed depends on the model-parallel position only, never on the
    data-parallel rank."""
    if not params:
        return None
    return FP8AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                    weight_decay=config.weight_decay, exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype,
                    fp8_grads=grads,
                    stochastic_rounding=stochastic_rounding, seed=seed + 7919 * (ps.tp_rank + ps.tp_size * ps.pp_rank))


class FP8WeightOptimizer(Optimizer):
    """FP8AdamW over the FP8-gradient weights this rank owns (all of them, or its share of whole
    tensors with the distributed optimizer); a part of a `ChainedOptimizer`."""

    def __init__(self, fp8_params, config: OptimizerConfig, ps: ParallelState, *, fp8_grads: FP8GradStore,
                 exp_avg_dtype: str, exp_avg_sq_dtype: str, stochastic_rounding: bool = False, seed: int = 0,
                 use_distributed_optimizer: bool = False, ddp=None):
        self.config, self.ps, self.fp8_grads = config, ps, fp8_grads
        # ``--overlap-param-gather``: the owners' broadcasts run on the wrapper's communication thread.
        self.ddp = ddp
        self.overlap_param_gather = ddp is not None and ddp.overlap_param_gather
        self.publish_dp_bytes = 0  # data-parallel bytes the last step sent to publish the FP8 weights
        self.fp8_params = list(fp8_params)
        if use_distributed_optimizer:
            self.owners = greedy_partition([p.numel() for p in self.fp8_params], ps.dp_size)
        else:
            self.owners = [ps.dp_rank] * len(self.fp8_params)
        self.owned = [p for p, owner in zip(self.fp8_params, self.owners) if owner == ps.dp_rank]
        self.fp8 = fp8_adamw(self.owned, fp8_grads, config, ps, exp_avg_dtype=exp_avg_dtype,
                             exp_avg_sq_dtype=exp_avg_sq_dtype,
                             stochastic_rounding=stochastic_rounding, seed=seed)

    @property
    def param_groups(self) -> list[dict]:
        return self.fp8.param_groups if self.fp8 is not None else []

    def grad_norm_squared(self) -> float:
        return self.grad_norm_squared_tensor().item()

    def grad_norm_squared_tensor(self) -> torch.Tensor:
        return fp8_grad_square_sum(self.fp8_params, self.fp8_grads, self.ps)

    def grad_norm(self) -> float:
        return norm_from_squares(self.grad_norm_squared())

    def apply(self, coefficient: float) -> None:
        """Clip (dividing the gradients' scales multiplies their values: exact, in place), update
        the owned weights, publish them to every data-parallel rank."""
        if self.fp8 is not None:
            for param in self.owned:
                self.fp8_grads.get(param).scale.div_(coefficient)
            self._fp8_step()
        before = self.ps.counter.snapshot()
        self._publish()
        self.publish_dp_bytes = self.ps.counter.since(before)["dp_bytes"]

    def _fp8_step(self) -> None:
        self.fp8.step()

    def _publish(self, overlap: bool | None = None) -> None:
        """Every data-parallel rank's copy of the FP8 weights updated from their owners (with
        ``--overlap-param-gather`` by the communication thread, each waited for by the forward
        that reads it)."""
        if self.ps.dp_size == 1 or all(owner == self.ps.dp_rank for owner in self.owners):
            return
        overlap = self.overlap_param_gather if overlap is None else overlap
        for owner in range(self.ps.dp_size):
            params = [p for p, o in zip(self.fp8_params, self.owners) if o == owner]
            if not params:
                continue
            if not overlap:
                self._broadcast_from(owner, params, self.ps)
                continue
            n, scaled = self.ps.dp_size, sum(1 for p in params if is_scaled_fp16(p))
            nbytes = comm.ring_bytes("broadcast", sum(p.numel() * p.element_size() for p in params), n)
            nbytes += comm.ring_bytes("broadcast", 4 * scaled, n) if scaled else 0
            self.ddp.gather_async(params, lambda ps, o=owner, group=params: self._broadcast_from(o, group, ps), nbytes)

    @staticmethod
    @torch.no_grad()
    def _broadcast_from(owner: int, params: list[nn.Parameter], ps: ParallelState) -> None:
        """`owner`'s updated FP16 masters and scales to the other data-parallel ranks: one payload
        and one scale collective."""
        payload = comm.broadcast(torch.cat([p.detach().reshape(-1) for p in params]), ps, "dp", owner)
        scaled = [p for p in params if is_scaled_fp16(p)]
        scales = comm.broadcast(torch.cat([p.scale.reshape(1) for p in scaled]), ps, "dp", owner) if scaled else []
        for param, value in zip(params, payload.split([p.numel() for p in params])):
            param.copy_(value.view_as(param))
        for param, scale in zip(scaled, scales):
            param.scale.copy_(scale.reshape(param.scale.shape))

    # ----- memory accounting ---------------------------------------------------------------------
    def master_bytes(self) -> int:
        return self.fp8.master_bytes() if self.fp8 is not None else 0

    def optim_bytes(self) -> int:
        return self.fp8.state_bytes() if self.fp8 is not None else 0

    def fp8_state_bytes(self) -> int:
        """Masters and moments of the FP8 weights held here (the weights themselves excluded)."""
        return (self.fp8.master_bytes() + self.fp8.state_bytes()) if self.fp8 is not None else 0

    # ----- checkpoints -------------------------------------------------------------------------
    def step_count(self) -> int:
        return self.fp8.step_count() if self.fp8 is not None else 0

    def local_state(self) -> dict[nn.Parameter, dict]:
        """Each owned FP8 weight's true value and FP32 moments."""
        out = {}
        for param in self.owned:
            entry = {"range": (0, param.numel()), "master": scaled_value(param).reshape(-1)}
            entry.update({k: v.reshape(-1) for k, v in self.fp8.state_fp32(param).items()})
            out[param] = entry
        return out

    def load_local_state(self, full_states: dict[nn.Parameter, dict[str, torch.Tensor]], step: int) -> None:
        for param in self.owned:
            given = full_states.get(param)
            if given and "exp_avg" in given and "exp_avg_sq" in given:
                self.fp8.load_state_fp32(param, {"exp_avg": given["exp_avg"], "exp_avg_sq": given["exp_avg_sq"]}, step)
