"""The optimizer a model gets, chosen from its precision plan (`AppliedPrecision`) and whether the
dense states are sharded (the distributed optimizer, ZeRO-1):

| FP8-gradient weights | optimizer |
|---|---|
| none | `MixedPrecisionOptimizer` (AdamW over FP32 masters), or `DistributedOptimizer` |
| some (O1, O2) | `ChainedOptimizer`: the above for the rest + `FP8WeightOptimizer` (FP8AdamW) |
| some (O3, FP8 ZeRO) | `ChainedOptimizer`: the above for the rest + `FP8ZeroWeightOptimizer` (owners' FP16 masters) |

Every part takes its gradients explicitly (`ddp.dense_grad`, the plan's `FP8GradStore`); a chain
shares one global norm, clip and skip rule.
"""

from __future__ import annotations

import torch.nn as nn

from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.optimizer import ChainedOptimizer, MixedPrecisionOptimizer, Optimizer, OptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.fp8_optimizer import FP8WeightOptimizer
from megatron.core.optimizer.fp8_zero import FP8ZeroWeightOptimizer
from megatron.core.parallel_state import ParallelState
from megatron.core.precision import AppliedPrecision


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], config: OptimizerConfig, ps: ParallelState,
                    ddp: DistributedDataParallel, precision: AppliedPrecision, *,
                    use_distributed_optimizer: bool, seed: int = 0) -> Optimizer:
    """The optimizer of `named_params` (the trainable parameters of the model `ddp` wraps)."""
    fp8_params = [p for p in precision.fp8_grad_params if p.requires_grad]
    fp8_ids = {id(p) for p in fp8_params}
    dense_named = [(n, p) for n, p in named_params if id(p) not in fp8_ids]
    if use_distributed_optimizer:
        dense = DistributedOptimizer(dense_named, config, ps, ddp)
    else:
        dense = MixedPrecisionOptimizer(dense_named, config, ps, grad_of=ddp.dense_grad, layouts=ddp.layouts)
    if not fp8_params:
        return dense
    _, exp_avg, exp_avg_sq = precision.optimizer_dtypes
    common = dict(fp8_grads=precision.grads, exp_avg_dtype=exp_avg, exp_avg_sq_dtype=exp_avg_sq,
                  stochastic_rounding=precision.stochastic_rounding, seed=seed)
    if precision.fp8_zero:
        fp8 = FP8ZeroWeightOptimizer(config, ps, layout=precision.zero, masters=precision.masters, ddp=ddp,
                                     **common)
    else:
        fp8 = FP8WeightOptimizer(fp8_params, config, ps, use_distributed_optimizer=use_distributed_optimizer, ddp=ddp,
                                 **common)
    return ChainedOptimizer([dense, fp8], config)
