"""The optimizer a model gets, chosen from what its precision plan changed (`AppliedPrecision`)
and whether the dense states are sharded (the distributed optimizer, ZeRO-1):

| FP8-gradient weights | FP8 ZeRO | optimizer |
|---|---|---|
| none | - | `MixedPrecisionOptimizer` (AdamW over FP32 masters), or `DistributedOptimizer` |
| some (O1, O2) | no | `FP8MixedPrecisionOptimizer`: FP8AdamW for them, the above for the rest |
| some (O3) | yes | `FP8ZeroOptimizer`: their FP16 masters and moments on owner ranks |

Every variant takes its gradients from the data-parallel wrapper explicitly (`ddp.main_grad`,
`ddp.fp8_grads`) and shares one global norm, clip and skip rule.
"""

from __future__ import annotations

import torch.nn as nn

from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.optimizer import MixedPrecisionOptimizer, OptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.fp8_optimizer import FP8MixedPrecisionOptimizer
from megatron.core.optimizer.fp8_zero import FP8ZeroOptimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.precision import AppliedPrecision


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], config: OptimizerConfig, ps: ParallelState,
                    ddp: DistributedDataParallel, precision: AppliedPrecision, *,
                    use_distributed_optimizer: bool, seed: int = 0):
    """The optimizer of `named_params` (the trainable parameters of the model `ddp` wraps)."""
    if not ddp.fp8_grad_params:
        if use_distributed_optimizer:
            return DistributedOptimizer(named_params, config, ps, ddp)
        return MixedPrecisionOptimizer(named_params, config, ps, grad_of=ddp.main_grad, layouts=ddp.layouts)
    _, exp_avg, exp_avg_sq = precision.optimizer_dtypes
    common = dict(exp_avg_dtype=exp_avg, exp_avg_sq_dtype=exp_avg_sq, fp8_grads=ddp.fp8_grads,
                  stochastic_rounding=precision.stochastic_rounding, seed=seed, ddp=ddp,
                  use_distributed_optimizer=use_distributed_optimizer)
    if ddp.fp8_zero is not None:
        casts = [precision.cast_of(p) for p in ddp.fp8_zero.params]
        return FP8ZeroOptimizer(named_params, config, ps, layout=ddp.fp8_zero, casts=casts, **common)
    return FP8MixedPrecisionOptimizer(named_params, config, ps, fp8_params=ddp.fp8_grad_params, **common)
