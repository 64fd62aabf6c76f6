"""`--fp8-level` -> a plan of what is FP8 where. The only module that branches on level names.

| level | GEMMs | weight copy              | master      | weight grad       | Adam m / v      |
|-------|-------|--------------------------|-------------|-------------------|-----------------|
| none  | BF16  | BF16 (FP32 without bf16) | FP32        | FP32              | FP32 / FP32     |
| O0    | FP8   | as none, cast per step   | FP32        | FP32              | FP32 / FP32     |
| O1    | FP8   | FP16 + scale (master)    | -           | FP8 E4M3 + scale  | FP32 / FP32     |
| O2    | FP8   | FP16 + scale (master)    | -           | FP8               | FP8 / FP16      |
| O3    | FP8   | FP8 + scale              | FP16, ZeRO  | FP8               | FP8 / FP16 ZeRO |

At O3 the linear weights are stored as FP8 E4M3 with a per-tensor scale (`fp8.params`); their
FP16 masters and Adam states live only on the data-parallel rank that owns each whole tensor
(`megatron.core.distributed.fp8_zero.FP8ZeroLayout`; `megatron.core.optimizer.fp8_zero`). With sequence parallelism the activations entering FP8
linears are all-gathered in FP8, and with `reduce_scatter` the input gradients are reduce-scattered
in FP8. `pipeline_p2p` sends pipeline activations / gradients as E4M3 / E5M2 with scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from fp8.autoscale import GradientAutoScaler
from fp8.gradients import FP8GradStore
from fp8.linear import FP8LinearState
from fp8.optim import ScaledFP16Parameter, make_scaled_fp16_param, to_scaled_fp16
from fp8.params import WeightCast, make_fp8_param, param_value
from fp8.scaling import RECIPES, DelayedScaling, DelayedScalingGroup, Recipe
from megatron.core.distributed.data_parallel import BUCKET_SIZE_MB
from megatron.core.distributed.fp8_reducer import FP8GradReducer
from megatron.core.distributed.fp8_zero import FP8ZeroLayout
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

LEVELS = ("none", "O0", "O1", "O2", "O3")
FP8_LAYER_SUFFIXES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(kw_only=True)
class FP8Config:
    """The `--fp8-*` flags."""

    level: str = "none"
    format: str = "hybrid"
    recipe: str = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0
    min_features: int = 128
    output_layer: bool = False
    # O1 / O2: gradients, masters and Adam states (None: the level's default, see `optimizer_dtypes`)
    wgrad_auto_scaling: bool = True
    wgrad_auto_scaling_ratio: float = 1e-5
    wgrad_auto_scaling_window: int = 1000
    main_params_dtype: str | None = None
    exp_avg_dtype: str | None = None
    exp_avg_sq_dtype: str | None = None
    fp16_master_stochastic_rounding: bool = False
    # O3: tensor / sequence / pipeline parallel traffic
    reduce_scatter: bool | None = None  # None: the level's default (REDUCE_SCATTER_DEFAULT)
    pipeline_p2p: bool | None = None  # None: the level's default (PIPELINE_P2P_DEFAULT)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"unknown --fp8-level {self.level!r}; use one of {', '.join(LEVELS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown --fp8-recipe {self.recipe!r}; use one of {', '.join(RECIPES)}")
        self.to_recipe()  # validates format, margin, history
        if self.main_params_dtype not in (None, "fp32", "fp16"):
            raise ValueError(f"--main-params-dtype {self.main_params_dtype!r}: use fp32 or fp16")
        if self.level == "O3" and self.main_params_dtype == "fp32":
            raise ValueError("--fp8-level O3 keeps FP16 masters (with scales) on the owner ranks; "
                             "drop --main-params-dtype fp32 or use --fp8-level O2")
        if self.reduce_scatter and self.level != "O3":
            raise ValueError("--fp8-reduce-scatter needs --fp8-level O3 (FP8 sequence-parallel traffic)")
        for flag, value in (("--exp-avg-dtype", self.exp_avg_dtype), ("--exp-avg-sq-dtype", self.exp_avg_sq_dtype)):
            if value not in (None, "fp32", "fp16", "bf16", "fp8"):
                raise ValueError(f"{flag} {value!r}: use fp32, fp16, bf16 or fp8")

    def optimizer_dtypes(self) -> tuple[str, str, str]:
        """(main params, exp_avg, exp_avg_sq) for the FP8-gradient weights: O1 keeps FP32 Adam
        states, O2 the paper's FP8 first and FP16 second moment; flags override."""
        o2 = self.level in ("O2", "O3")
        return (self.main_params_dtype or "fp16", self.exp_avg_dtype or ("fp8" if o2 else "fp32"),
                self.exp_avg_sq_dtype or ("fp16" if o2 else "fp32"))

    def to_recipe(self) -> Recipe:
        return Recipe(fmt=self.format, recipe=self.recipe, amax_history_len=self.amax_history_len,
                      amax_compute_algo=self.amax_compute_algo, margin=self.margin, min_features=self.min_features)


@dataclass(frozen=True)
class PrecisionPlan:
    level: str
    fp8_gemms: bool
    fp8_wgrad: bool
    fp8_optimizer_states: bool
    fp8_zero: bool            # FP8 weight storage (1 byte) with masters / states on owner ranks
    fp8_tp_comm: bool         # FP8 sequence-parallel all-gathers into (and out of) FP8 linears
    fp8_reduce_scatter: bool  # FP8 sequence-parallel reduce-scatter of input gradients
    fp8_pipeline_p2p: bool    # FP8 pipeline sends


# Whether O3 sends pipeline activations / gradients in FP8 unless told otherwise: decided by the
# accuracy measurement in docs/benchmarks.md ("FP8 pipeline sends").
PIPELINE_P2P_DEFAULT = {"O3": True}
# Whether O3 reduce-scatters sequence-parallel input gradients in FP8 unless told otherwise:
# decided by the accuracy measurement in docs/benchmarks.md ("FP8 sequence-parallel reduce-scatter").
REDUCE_SCATTER_DEFAULT = {"O3": True}


def plan_for(config: FP8Config) -> PrecisionPlan:
    level = LEVELS.index(config.level)
    return PrecisionPlan(
        level=config.level,
        fp8_gemms=level >= 1,
        fp8_wgrad=level >= 2,
        fp8_optimizer_states=level >= 3,
        fp8_zero=level >= 4,
        fp8_tp_comm=level >= 4,
        fp8_reduce_scatter=level >= 4 and (config.reduce_scatter if config.reduce_scatter is not None
                                           else REDUCE_SCATTER_DEFAULT.get(config.level, False)),
        fp8_pipeline_p2p=(config.pipeline_p2p if config.pipeline_p2p is not None
                          else PIPELINE_P2P_DEFAULT.get(config.level, False)),
    )


def _wants_fp8(name: str, config: FP8Config) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in FP8_LAYER_SUFFIXES or (config.output_layer and leaf == "output_layer")


@dataclass(frozen=True, eq=False)
class AppliedPrecision:
    """What the precision plan changed in a model, handed to the consumers that need it: the
    data-parallel wrapper (the FP8 gradients' reducer, with its auto-scaler and owners), the
    optimizers (which weights FP8AdamW updates, their O3 masters) and the trainer (the plan:
    pipeline codec, sharding)."""

    plan: PrecisionPlan
    grads: FP8GradStore | None = None                # where the FP8 linears leave FP8 weight gradients
    fp8_linears: tuple[str, ...] = ()                # modules running FP8 GEMMs
    fp8_grad_params: tuple[nn.Parameter, ...] = ()   # weights with FP8 gradients (O1+), model order
    casts: tuple[WeightCast, ...] = ()               # how each of those is cast to FP8
    # FP8AdamW for those weights: (master, exp_avg, exp_avg_sq) formats, stochastic FP16 rounding
    optimizer_dtypes: tuple[str, str, str] = ("fp16", "fp32", "fp32")
    stochastic_rounding: bool = False
    reducer: FP8GradReducer | None = None            # O1+: the FP8 gradients' data-parallel mean (auto-scaler, owners)
    zero: FP8ZeroLayout | None = None                # O3: which data-parallel rank owns each FP8 weight
    masters: dict = field(default_factory=dict)      # O3: this rank's owned weights -> FP16 masters
    # With `once_per_step`: the FP8 linears' delayed-scaling histories (updated together by
    # `end_step`) and their kernels (whose FP8 weight copies `end_step` drops).
    scalings: DelayedScalingGroup | None = None
    kernels: tuple[FP8LinearState, ...] = ()

    def end_step(self) -> None:
        """After a step's optimizer update (`apply_precision(..., once_per_step=True)`): delayed
        scaling records the step's amaxes, and the FP8 weight copies the step's micro-batches
        shared are dropped (the weights just changed)."""
        if self.scalings is not None:
            self.scalings.update()
        for kernel in self.kernels:
            kernel.drop_weight_copies()

    def is_fp8_grad(self, param: nn.Parameter) -> bool:
        return any(param is p for p in self.fp8_grad_params)

    @property
    def fp8_zero(self) -> bool:
        return self.zero is not None


def apply_precision(model: nn.Module, config: FP8Config, ps: ParallelState, *,
                    bucket_size_mb: float = BUCKET_SIZE_MB, once_per_step: bool = False) -> AppliedPrecision:
    """Give the transformer linears of a parallelized model (every pipeline chunk of it) the FP8
    kernel the level asks for, turn their weights into the level's kinds, and return what
    changed. The size filter looks at each rank's local shard, which is what the GEMM kernels see.

    O1 and up: each FP8-gradient weight becomes its own FP16 master with a scale, and their
    gradients get a reducer (`FP8GradReducer`, with the auto-scaler). O3: the weights are given
    owners over the data-parallel ranks (`FP8ZeroLayout`, buckets of `bucket_size_mb`), each owner
    keeps an FP16 master of its weights, and every weight becomes FP8 - cast from the same FP16
    values on every rank, so no collective is needed to start.

    With `once_per_step` (the trainer's choice) the caller calls `end_step()` after every optimizer
    update: delayed-scaling histories are then updated once per step for all linears
    (`fp8.scaling.DelayedScalingGroup`), and from O1 each linear casts its weight to FP8 once per
    step and shares that copy among the step's micro-batches, forward and backward (the same bits
    as a cast per use; one byte per FP8 weight value held during the step). Without it every cast
    records its amax and every use casts the weight again, which loops that do not call
    `end_step` rely on."""
    plan = plan_for(config)
    grads = FP8GradStore() if plan.fp8_wgrad else None
    recipe = config.to_recipe()
    names, params, casts, delayed, kernels = [], [], [], [], []
    if plan.fp8_gemms:
        for name, module in _fp8_linears(model, config, recipe):
            module.kernel = FP8LinearState(recipe, fp8_wgrad=plan.fp8_wgrad, fp8_comm=plan.fp8_tp_comm,
                                           fp8_reduce_scatter=plan.fp8_reduce_scatter, grads=grads)
            names.append(name)
            delayed += [s for s in module.kernel.scalers.values() if isinstance(s, DelayedScaling)]
            if once_per_step:
                kernels.append(module.kernel)
                if plan.fp8_wgrad:
                    # O1 and up, whose FP8 weights and gradients leave room for the copies (one
                    # byte per weight value during the step). O0 keeps BF16's weights and
                    # gradients: its copies would take it above BF16's peak memory.
                    module.kernel.keep_weight_copies()
            if plan.fp8_wgrad:
                params.append(module.weight)
                casts.append(WeightCast(recipe.margin, recipe.power_of_two))
                if config.optimizer_dtypes()[0] == "fp16":
                    # The weight is its own master, FP16 with a per-tensor scale, unless
                    # --main-params-dtype fp32 (refused at O3).
                    make_scaled_fp16_param(module.weight)
    zero, masters = None, {}
    if plan.fp8_zero and params:
        zero = FP8ZeroLayout(params, ps.dp_size, int(bucket_size_mb * 2**20))
        masters = {p: _fp16_master(p) for p in zero.owned(ps.dp_rank)}
        for param, cast in zip(params, casts):
            make_fp8_param(param, cast)
    reducer = None
    trainable = [p for p in params if p.requires_grad]
    if trainable:
        autoscaler = None
        if config.wgrad_auto_scaling:
            autoscaler = GradientAutoScaler(ratio=config.wgrad_auto_scaling_ratio,
                                            window=config.wgrad_auto_scaling_window)
        reducer = FP8GradReducer(trainable, grads, ps, autoscaler=autoscaler, zero=zero)
    return AppliedPrecision(plan, grads, tuple(names), tuple(params), tuple(casts), config.optimizer_dtypes(),
                            config.fp16_master_stochastic_rounding, reducer, zero, masters,
                            DelayedScalingGroup(delayed) if delayed and once_per_step else None, tuple(kernels))


def _fp8_linears(model: nn.Module, config: FP8Config, recipe):
    """(name, module) of the tensor-parallel linears that run FP8 GEMMs under `config`: the
    transformer's (and the head with `output_layer`), where the size filter admits the local shard."""
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and _wants_fp8(name, config):
            out_local, in_local = module.weight.shape
            if recipe.uses_fp8(in_local, out_local):
                yield name, module


def apply_inference_precision(model: nn.Module, config: FP8Config) -> tuple[str, ...]:
    """The level's GEMMs for a model that only runs forward (generation, evaluation): FP8 GEMMs
    in the transformer linears from O0 up, and from O3 weights stored in FP8 (one byte each plus
    a scale) and read by the GEMMs as stored. Nothing for training: no FP8 gradients, masters or
    reducers. Call before loading weights: `set_param_value` then casts each loaded value straight
    into its FP8 weight, so no high-precision copy of the model exists. Returns the FP8 linears."""
    plan = plan_for(config)
    if not plan.fp8_gemms:
        return ()
    recipe = config.to_recipe()
    names = []
    for name, module in _fp8_linears(model, config, recipe):
        module.kernel = FP8LinearState(recipe)
        if plan.fp8_zero:
            make_fp8_param(module.weight, WeightCast(recipe.margin, recipe.power_of_two))
        names.append(name)
    return tuple(names)


def _fp16_master(param: nn.Parameter) -> ScaledFP16Parameter:
    """A separate FP16 master with a scale, holding `param`'s value."""
    payload, scale = to_scaled_fp16(param_value(param).float())
    return ScaledFP16Parameter.new(payload, scale)
