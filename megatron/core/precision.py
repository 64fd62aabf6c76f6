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
(`megatron.core.optimizer.fp8_zero`). With sequence parallelism the activations entering FP8
linears are all-gathered in FP8, and with `reduce_scatter` the input gradients are reduce-scattered
in FP8. `pipeline_p2p` sends pipeline activations / gradients as E4M3 / E5M2 with scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from fp8.gradients import FP8GradStore
from fp8.linear import FP8LinearState
from fp8.optim import is_scaled_fp16, make_scaled_fp16_param
from fp8.params import WeightCast, is_fp8_param
from fp8.scaling import RECIPES, Recipe
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
    data-parallel wrapper (which gradients arrive in FP8, whether they go to owners) and the
    optimizers (which weights FP8AdamW updates, how O3 casts each to FP8). Read from the FP8
    linears' own state (`precision_of`), never from attributes on parameters."""

    plan: PrecisionPlan
    grads: FP8GradStore | None = None                # where the FP8 linears leave FP8 weight gradients
    fp8_linears: tuple[str, ...] = ()                # modules running FP8 GEMMs
    fp8_grad_params: tuple[nn.Parameter, ...] = ()   # weights with FP8 gradients (O1+), model order
    casts: tuple[WeightCast, ...] = ()               # how each of those is cast to FP8 (O3)
    # FP8AdamW for those weights: (master, exp_avg, exp_avg_sq) formats, stochastic FP16 rounding
    optimizer_dtypes: tuple[str, str, str] = ("fp16", "fp32", "fp32")
    stochastic_rounding: bool = False

    def is_fp8_grad(self, param: nn.Parameter) -> bool:
        return any(param is p for p in self.fp8_grad_params)

    def cast_of(self, param: nn.Parameter) -> WeightCast:
        return next(cast for p, cast in zip(self.fp8_grad_params, self.casts) if p is param)

    @property
    def fp8_zero(self) -> bool:
        return self.plan.fp8_zero and bool(self.fp8_grad_params)


def apply_precision(model: nn.Module, config: FP8Config) -> AppliedPrecision:
    """Give the transformer linears of a parallelized model FP8 state as the level asks, and
    return what changed. The size filter looks at each rank's local shard, which is what the
    GEMM kernels see."""
    plan = plan_for(config)
    grads = FP8GradStore() if plan.fp8_wgrad else None
    if plan.fp8_gemms:
        recipe = config.to_recipe()
        for name, module in model.named_modules():
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or not _wants_fp8(name, config):
                continue
            out_local, in_local = module.weight.shape
            if recipe.uses_fp8(in_local, out_local):
                module.kernel = FP8LinearState(recipe, fp8_wgrad=plan.fp8_wgrad, fp8_comm=plan.fp8_tp_comm,
                                               fp8_reduce_scatter=plan.fp8_reduce_scatter, grads=grads)
                if plan.fp8_wgrad and config.optimizer_dtypes()[0] == "fp16":
                    # O1 and up: the weight is its own master, FP16 with a per-tensor scale
                    # unless --main-params-dtype fp32 (refused at O3).
                    make_scaled_fp16_param(module.weight)
    return precision_of(model, config)


def precision_of(model: nn.Module, config: FP8Config) -> AppliedPrecision:
    """The `AppliedPrecision` of a model `apply_precision` has changed (every pipeline chunk of
    it when `model` holds several): read from its FP8 linears' state."""
    plan = plan_for(config)
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(getattr(module, "fp8", None), FP8LinearState)]
    with_fp8_grad = {id(module.weight): module.fp8.recipe for _, module in linears if module.fp8.fp8_wgrad}
    stores = {id(module.fp8.grads): module.fp8.grads for _, module in linears if module.fp8.fp8_wgrad}
    assert len(stores) <= 1, "the FP8 linears of one model share one FP8GradStore"
    params = [p for p in model.parameters() if id(p) in with_fp8_grad]
    casts = [WeightCast(with_fp8_grad[id(p)].margin, with_fp8_grad[id(p)].power_of_two) for p in params]
    assert not plan.fp8_zero or all(is_scaled_fp16(p) or is_fp8_param(p) for p in params), \
        "FP8Config refuses --main-params-dtype fp32 at O3"
    return AppliedPrecision(plan, next(iter(stores.values()), None), tuple(name for name, _ in linears),
                            tuple(params), tuple(casts), config.optimizer_dtypes(),
                            config.fp16_master_stochastic_rounding)
