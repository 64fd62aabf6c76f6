"""One typed configuration of a run, from which the command line and the YAML loader are made.

    config = parse_config(argv)                  # RunConfig: frozen, checked
    config = config.for_world(world_size)        # + the checks and defaults that need the world size
    config.model.num_layers, config.precision.fp8_config(), ...
    config.num_layers                            # the same field by its flag name (Megatron's `args.x`)

Every flag is one field of one section (`ModelArgs`, `ParallelArgs`, `PrecisionArgs`,
`OptimizerArgs`, `ScheduleArgs`, `DataArgs`, `TokenizerArgs`, `TrainingArgs`, `CheckpointArgs`,
`LoggingArgs`), named as Megatron-LM names the flag (``--num-layers`` is ``num_layers``), with its
type, default, help and choices. `build_parser` generates argparse from the sections; `--config
FILE.yaml` supplies defaults under the same names (``-`` or ``_``), flags on the command line
override it, and unknown flags or keys are errors. Checks live in the sections' ``__post_init__``
and `RunConfig.__post_init__` (across sections); defaults that follow other flags
(``--max-position-embeddings`` from ``--seq-length``, ``--num-query-groups``) are resolved while
the config is built, ``--global-batch-size`` by `for_world`, and the iterations of a sample-based
run (``--train-samples``, with or without ``--rampup-batch-size``) by `RunConfig.train_iters` once
the batch is known. Nothing changes a config afterwards:
sections are frozen, and a contradiction is an error. All errors are `ValueError`s with the fix in
the message; `megatron.training.cli` turns them into one line on stderr and exit code 2.

Entry points with flags of their own (SFT, RLHF) add sections: ``parse_config(argv,
extra_sections={"sft": SFTArgs})``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from fp8.calibration import check_flags as check_calibration_flags, configured_min_features
from fp8.scaling import RECIPES
from megatron.core.datasets.config import GPTDatasetConfig
from megatron.core.num_microbatches_calculator import BatchSchedule
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.grad_scaler import LossScalerConfig
from megatron.core.pipeline_parallel.model import virtual_pipeline_size
from megatron.core.precision import LEVELS, FP8Config
from megatron.training.attention_backend import ATTENTION_BACKENDS
from megatron.training.flags import (ArgumentParser, ParallelArgs, Section, TokenizerArgs, check_positive, flag,
                                     load_yaml_defaults)
from megatron.training.host_memory import DEFAULT_THRESHOLD_MB
from megatron.training.lr_schedule import DECAY_STYLES, WSD_DECAY_STYLES, LRScheduleConfig
from megatron.training.metrics import WANDB_MODES


# ----- the sections ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelArgs(Section):
    title: ClassVar[str] = "model"
    num_layers: int | None = flag(None)
    hidden_size: int | None = flag(None)
    ffn_hidden_size: int | None = flag(None, "default 4 x hidden size")
    num_attention_heads: int | None = flag(None)
    group_query_attention: bool = flag(
        False, "grouped-query attention with --num-query-groups key/value heads (default 1), as Megatron-LM")
    num_query_groups: int | None = flag(None, "needs --group-query-attention")
    kv_channels: int | None = flag(None, "head dimension; default hidden / heads")
    max_position_embeddings: int | None = flag(None, "default --seq-length")
    normalization: str = flag("LayerNorm", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float = flag(1e-5)
    swiglu: bool = flag(False)
    position_embedding_type: str = flag("learned_absolute", choices=("learned_absolute", "rope"))
    rotary_base: float = flag(10000.0)
    hidden_dropout: float = flag(0.1)
    attention_dropout: float = flag(0.1)
    init_method_std: float = flag(0.02)
    untie_embeddings_and_output_weights: bool = flag(False)
    disable_bias_linear: bool = flag(False)
    make_vocab_size_divisible_by: int = flag(128)
    recompute_granularity: str | None = flag(None, choices=("full", "selective"))
    recompute_method: str | None = flag(None, choices=("uniform", "block"))
    recompute_num_layers: int | None = flag(None)
    attention_backend: str = flag(
        "auto", "Megatron-LM's choices mapped to PyTorch's attention kernels: auto (PyTorch picks), flash, fused "
                "(the memory-efficient / cuDNN kernels), unfused and local (the reference softmax(QK^T)V); a kernel "
                "the device cannot run is refused at start (README)", choices=ATTENTION_BACKENDS)

    def __post_init__(self) -> None:
        check_positive(self, "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                  "make_vocab_size_divisible_by")
        if self.num_query_groups is not None and not self.group_query_attention:
            raise ValueError(f"--num-query-groups {self.num_query_groups} takes effect only with "
                             "--group-query-attention (as in Megatron-LM); add --group-query-attention or "
                             "drop --num-query-groups")

    @property
    def query_groups(self) -> int | None:
        """Key/value heads: --num-query-groups with --group-query-attention (default 1), else one per head."""
        if self.group_query_attention:
            return self.num_query_groups or 1
        return self.num_attention_heads

    def padded_vocab_size(self, vocab_size: int, tp_size: int) -> int:
        """Pad so that every tensor-parallel shard of the vocabulary has a multiple of
        --make-vocab-size-divisible-by rows (Megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class PrecisionArgs(Section):
    title: ClassVar[str] = "precision"
    bf16: bool = flag(False, "BF16 parameters and activations (FP32 masters)")
    fp16: bool = flag(False, "FP16 parameters and activations (FP32 masters) with loss scaling: dynamic, or "
                             "--loss-scale")
    loss_scale: float | None = flag(None, "a constant loss scale (a power of 2); default with --fp16: dynamic")
    initial_loss_scale: float | None = flag(None, f"--fp16: the dynamic loss scale to start from (default "
                                                  f"2^{int(math.log2(LossScalerConfig.initial_scale))})")
    min_loss_scale: float | None = flag(None, "--fp16: the dynamic loss scale's floor (default 1)")
    loss_scale_window: int | None = flag(None, "--fp16: steps without overflow after which the loss scale doubles "
                                               f"(default {LossScalerConfig.growth_interval})")
    hysteresis: int | None = flag(None, "--fp16: overflowing steps (skipped) before the loss scale halves "
                                        f"(default {LossScalerConfig.hysteresis})")
    fp8_level: str | None = flag(
        None, "none or O0-O3 (README, 'Precision levels'); default none, or O0 when --fp8-format is given",
        choices=LEVELS)
    fp8_format: str | None = flag(
        None, "hybrid (E4M3 forward, E5M2 gradients) or e4m3; given alone it turns on FP8 GEMMs "
              "(--fp8-level O0), as in Megatron-LM; default hybrid", choices=("hybrid", "e4m3"))
    fp8_recipe: str = flag("delayed", choices=RECIPES)
    fp8_amax_history_len: int = flag(1024, "delayed scaling: amax history length (Transformer Engine's default; "
                                           "Megatron-LM's flag defaults to 1)")
    fp8_amax_compute_algo: str = flag("max", "delayed scaling: scale from the history's max or its most recent "
                                             "amax (Megatron-LM's flag defaults to most_recent)",
                                      choices=("max", "most_recent"))
    fp8_margin: int = flag(0)
    fp8_min_features: int | None = flag(
        None, "linears narrower than this (per rank) stay in high precision; auto (default): from the GPU's "
              "calibration (fp8/calibration.py), else 128", auto=True, metavar="N|auto")
    fp8_calibration: str | None = flag(None, "--fp8-min-features auto: the calibration file bench/gpu_suite.py wrote")
    fp8_output_layer: bool = flag(False, "FP8 GEMMs in the output head too")
    fp8_fused_casts: str = flag("auto", "FP8 casts as compiled kernels (fp8/fused.py; auto: on CUDA with Triton), "
                                        "the same bits", choices=("auto", "on", "off"))
    fp8_chunk_mb: float | None = flag(
        None, "MiB of FP32 values that an FP8 cast, a gradient-reduction round or an FP8 optimizer chunk works on "
              "at once: bounds their temporaries; fewer, larger chunks launch fewer kernels and collectives; the "
              "same bits at any size; auto (default): 256 on CUDA, 4 elsewhere", auto=True, metavar="MB|auto")
    fp8_wgrad_auto_scaling: bool = flag(
        True, "O1+: adapt the gradient pre-scaling factor mu (FP8-LM 2.1); off: divide by DP first")
    fp8_wgrad_auto_scaling_ratio: float = flag(1e-5, "overflow fraction above which mu halves")
    fp8_wgrad_auto_scaling_window: int = flag(1000, "steps below the ratio after which mu doubles (up to 2)")
    main_params_dtype: str | None = flag(
        None, "O1+: master of the FP8 linear weights (default fp16 with a per-tensor scale)", choices=("fp32", "fp16"))
    exp_avg_dtype: str | None = flag(
        None, "Adam first moment of the FP8 linear weights (default: fp32 at O1, fp8 at O2)",
        choices=("fp32", "fp16", "bf16", "fp8"))
    exp_avg_sq_dtype: str | None = flag(
        None, "Adam second moment of the FP8 linear weights (default: fp32 at O1, fp16 at O2)",
        choices=("fp32", "fp16", "bf16", "fp8"))
    fp16_master_stochastic_rounding: bool = flag(
        False, "round FP16 master updates stochastically (long runs, small late updates)")
    fp8_reduce_scatter: bool | None = flag(
        None, "O3 with --sequence-parallel: the backward reduce-scatter of input gradients in FP8 "
              "(default: the level's choice, see README)", negatable=True)
    fp8_pipeline_p2p: bool | None = flag(
        None, "pipeline sends in FP8: activations E4M3, gradients E5M2, with scales "
              "(default: the level's choice, see README)", negatable=True)

    def __post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 contradict each other; pass one")
        if not self.fp16:
            given = [name for name in _DYNAMIC_LOSS_SCALE_FLAGS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} sets dynamic loss scaling, which --fp16 turns on; "
                                 "add --fp16 or drop it")
        self.loss_scaler_config()  # checks the loss-scale flags
        # Upstream's --fp8-format alone turns on FP8 GEMMs (Transformer Engine's) over high-precision
        # weights, which is level O0 here; resolved once, so that the checkpoint records the level.
        if self.fp8_level is None:
            object.__setattr__(self, "fp8_level", "O0" if self.fp8_format is not None else "none")
        if self.fp8_format is None:
            object.__setattr__(self, "fp8_format", "hybrid")
        if self.fp16 and self.fp8_level in ("O1", "O2", "O3"):
            raise ValueError(f"--fp16 with --fp8-level {self.fp8_level} is not supported: from O1 the FP8 linears' "
                             "weights become their own FP16 masters with per-tensor scales (made from an FP32 or BF16 "
                             "model) and their gradients FP8 with scales of their own, which need no loss scale; use "
                             "--bf16 at O1-O3, or --fp16 at --fp8-level none or O0")
        if self.fp8_chunk_mb is not None and not 0 < self.fp8_chunk_mb < math.inf:
            raise ValueError(f"--fp8-chunk-mb must be a positive number of MiB (or auto), got {self.fp8_chunk_mb}")
        check_calibration_flags(self.fp8_min_features, self.fp8_calibration)
        self.fp8_config()  # FP8Config checks the combination

    def fp8_config(self) -> FP8Config:
        return FP8Config(level=self.fp8_level, format=self.fp8_format, recipe=self.fp8_recipe,
                         amax_history_len=self.fp8_amax_history_len, amax_compute_algo=self.fp8_amax_compute_algo,
                         margin=self.fp8_margin, min_features=configured_min_features(
                             self.fp8_min_features, self.fp8_calibration, self.fp8_recipe),
                         output_layer=self.fp8_output_layer, wgrad_auto_scaling=self.fp8_wgrad_auto_scaling,
                         wgrad_auto_scaling_ratio=self.fp8_wgrad_auto_scaling_ratio,
                         wgrad_auto_scaling_window=self.fp8_wgrad_auto_scaling_window,
                         main_params_dtype=self.main_params_dtype, exp_avg_dtype=self.exp_avg_dtype,
                         exp_avg_sq_dtype=self.exp_avg_sq_dtype,
                         fp16_master_stochastic_rounding=self.fp16_master_stochastic_rounding,
                         reduce_scatter=self.fp8_reduce_scatter, pipeline_p2p=self.fp8_pipeline_p2p)

    def loss_scaler_config(self) -> LossScalerConfig | None:
        """The loss scaler: dynamic with --fp16 (unless --loss-scale), constant with --loss-scale,
        none otherwise (BF16 and FP32 need none)."""
        if not self.fp16 and self.loss_scale is None:
            return None
        defaults = LossScalerConfig()
        return LossScalerConfig(
            constant_scale=self.loss_scale,
            initial_scale=_or(self.initial_loss_scale, defaults.initial_scale),
            min_scale=_or(self.min_loss_scale, defaults.min_scale),
            growth_interval=_or(self.loss_scale_window, defaults.growth_interval),
            hysteresis=_or(self.hysteresis, defaults.hysteresis))

    @property
    def params_dtype(self) -> torch.dtype:
        if self.fp16:
            return torch.float16
        return torch.bfloat16 if self.bf16 else torch.float32


_DYNAMIC_LOSS_SCALE_FLAGS = ("initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")


def _or(value, default):
    return default if value is None else value


@dataclass(frozen=True)
class OptimizerArgs(Section):
    title: ClassVar[str] = "optimizer"
    weight_decay: float = flag(0.01)
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.999)
    adam_eps: float = flag(1e-8)
    clip_grad: float = flag(1.0, "clip the global gradient norm to this (0: off)")

    def optimizer_config(self, lr: float) -> OptimizerConfig:
        return OptimizerConfig(lr=lr, weight_decay=self.weight_decay, adam_beta1=self.adam_beta1,
                               adam_beta2=self.adam_beta2, adam_eps=self.adam_eps, clip_grad=self.clip_grad)


@dataclass(frozen=True)
class ScheduleArgs(Section):
    title: ClassVar[str] = "learning-rate schedule"
    lr: float | None = flag(None, "peak learning rate (after warm-up)")
    min_lr: float = flag(0.0, "learning rate at and after --lr-decay-iters")
    lr_decay_style: str = flag("linear", "shape of the decay", choices=DECAY_STYLES)
    lr_decay_iters: int | None = flag(None, "iteration at which the decay reaches --min-lr (default: --train-iters)")
    lr_decay_samples: int | None = flag(None, "sample-based: samples at which the decay reaches --min-lr (default: "
                                              "--train-samples)")
    lr_warmup_iters: int = flag(0, "linear warm-up from 0 over this many iterations")
    lr_warmup_samples: int = flag(0, "sample-based: linear warm-up from 0 over this many samples")
    lr_warmup_fraction: float | None = flag(None, "warm-up as a fraction of --lr-decay-iters / --lr-decay-samples "
                                                  "(instead of --lr-warmup-iters / --lr-warmup-samples)")
    lr_wsd_decay_iters: int | None = flag(None, "WSD: length of the final anneal")
    lr_wsd_decay_samples: int | None = flag(None, "WSD, sample-based: length of the final anneal in samples")
    lr_wsd_decay_style: str = flag("exponential", "WSD: shape of the final anneal", choices=WSD_DECAY_STYLES)
    override_opt_param_scheduler: bool = flag(
        False, "on resume, use this run's schedule flags where they differ from the checkpoint's")
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, "on resume, use the checkpoint's schedule where it differs from this run's flags")

    def __post_init__(self) -> None:
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler "
                             "contradict each other; pass at most one")

    def lr_schedule_config(self, train_iters: int | None, *, train_samples: int | None = None,
                           samples_per_iteration: int | None = None) -> LRScheduleConfig:
        """The schedule in iterations (the iteration flags), or in samples: with `train_samples`
        (the sample flags), or the iteration flags converted at `samples_per_iteration` (the final
        global batch) for a run whose batch ramps up, as Megatron-LM's scheduler counts them."""
        if self.lr is None:
            raise ValueError("--lr is required (the peak learning rate, e.g. --lr 3e-4)")
        common = dict(lr=self.lr, min_lr=self.min_lr, decay_style=self.lr_decay_style,
                      wsd_decay_style=self.lr_wsd_decay_style)
        if train_samples is not None:
            return LRScheduleConfig(**common, unit="samples", warmup_iters=self.lr_warmup_samples,
                                    warmup_fraction=self.lr_warmup_fraction, decay_iters=self.lr_decay_samples,
                                    wsd_decay_iters=self.lr_wsd_decay_samples, train_iters=train_samples)
        config = LRScheduleConfig(**common, warmup_iters=self.lr_warmup_iters, warmup_fraction=self.lr_warmup_fraction,
                                  decay_iters=self.lr_decay_iters, wsd_decay_iters=self.lr_wsd_decay_iters,
                                  train_iters=train_iters)
        if samples_per_iteration is None:
            return config
        batch = samples_per_iteration
        decay = config.total_decay_iters * batch
        warmup = (int(self.lr_warmup_fraction * decay) if self.lr_warmup_fraction is not None
                  else self.lr_warmup_iters * batch)
        wsd = None if self.lr_wsd_decay_iters is None else self.lr_wsd_decay_iters * batch
        return LRScheduleConfig(**common, unit="samples", warmup_iters=warmup, decay_iters=decay, wsd_decay_iters=wsd,
                                train_iters=None if train_iters is None else train_iters * batch)

    @property
    def mismatch_policy(self) -> str:
        """`on_mismatch` for `LRScheduler.load_state_dict` from Megatron's two resume flags."""
        if self.override_opt_param_scheduler:
            return "override"
        return "use_checkpoint" if self.use_checkpoint_opt_param_scheduler else "error"


_DATASET_DEFAULTS = {f.name: f.default for f in fields(GPTDatasetConfig) if f.default is not MISSING}


@dataclass(frozen=True)
class DataArgs(Section):
    title: ClassVar[str] = "data"
    data_path: list[str] | None = flag(None, "dataset prefixes (A B) or weight/prefix pairs (0.7 A 0.3 B)")
    split: str = flag(_DATASET_DEFAULTS["split"], "train,valid,test shares of each dataset's documents, e.g. 969,30,1")
    seq_length: int | None = flag(None, "tokens per training sample")
    data_cache_path: str | None = flag(None, "folder for the cached sample indices (default: cache/ beside each "
                                             "dataset)")
    eod_mask_loss: bool = flag(False, "no loss where the input token is EOD")
    num_workers: int = flag(2, "data loader worker processes")

    def __post_init__(self) -> None:
        check_positive(self, "seq_length")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")

    def dataset_config(self, seed: int) -> GPTDatasetConfig:
        if not self.data_path:
            raise ValueError("no training data; pass --data-path PREFIX (tools/builtin_corpus.py --print-args "
                             "gives one)")
        if self.seq_length is None:
            raise ValueError("--seq-length is required")
        return GPTDatasetConfig(data_path=self.data_path, seq_length=self.seq_length, split=self.split, seed=seed,
                                data_cache_path=self.data_cache_path, eod_mask_loss=self.eod_mask_loss)


@dataclass(frozen=True)
class TrainingArgs(Section):
    title: ClassVar[str] = "training"
    micro_batch_size: int = flag(1)
    global_batch_size: int | None = flag(None, "default micro batch x data-parallel size")
    rampup_batch_size: list[int] | None = flag(
        None, "ramp the global batch up from START to --global-batch-size in steps of INCREMENT over the first "
              "SAMPLES samples (Megatron-LM's)", nargs=3, metavar=("START", "INCREMENT", "SAMPLES"))
    train_iters: int | None = flag(None)
    train_samples: int | None = flag(None, "sample-based training: train on this many samples (instead of "
                                           "--train-iters; with the --lr-*-samples flags)")
    seed: int = flag(_DATASET_DEFAULTS["seed"], "random seed")
    device: str = flag("auto", choices=("auto", "cpu", "cuda"))
    malloc_mmap_threshold_mb: float = flag(
        DEFAULT_THRESHOLD_MB, "on CPU: glibc returns freed blocks of this many MiB and more to the system at once "
        "(0: glibc's adaptive default, which keeps a step's peak resident; MALLOC_MMAP_THRESHOLD_ in the "
        "environment wins)")
    calculate_per_token_loss: bool | None = flag(
        None, "a token-averaged loss is the sum over the global batch's tokens divided by their number, across "
              "micro-batches and data-parallel ranks (Megatron-LM's), so it does not depend on --micro-batch-size "
              "or the data-parallel size; --no-calculate-per-token-loss: each micro-batch's own token mean, "
              "averaged. Default: on for SFT, GRPO and PPO, off for pretraining", negatable=True)
    log_interval: int = flag(100)
    eval_interval: int = flag(1000)
    eval_iters: int = flag(100)

    def __post_init__(self) -> None:
        check_positive(self, "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "log_interval",
                       "eval_interval")
        if self.rampup_batch_size is not None:
            if len(self.rampup_batch_size) != 3:
                raise ValueError("--rampup-batch-size takes three numbers: START INCREMENT SAMPLES")
            object.__setattr__(self, "rampup_batch_size", [int(v) for v in self.rampup_batch_size])  # YAML strings
        if self.eval_iters < 0 or self.seed < 0:
            raise ValueError("--eval-iters and --seed must be >= 0")
        if self.malloc_mmap_threshold_mb < 0:
            raise ValueError("--malloc-mmap-threshold-mb must be >= 0 (0 keeps glibc's adaptive default)")


@dataclass(frozen=True)
class CheckpointArgs(Section):
    title: ClassVar[str] = "checkpointing"
    save: str | None = flag(None, "folder to write checkpoints to")
    save_interval: int | None = flag(None, "save every N iterations (and at the end)")
    load: str | None = flag(None, "folder to resume from (its latest checkpoint)")
    finetune: bool = flag(False, "load weights only: fresh optimizer, iteration 0")
    no_load_optim: bool = flag(False, "do not load the optimizer state")
    no_load_rng: bool = flag(False, "do not load the random-number states")
    no_verify_checkpoint_checksums: bool = flag(
        False, "at load, check the files' sizes against the checkpoint's manifest but not their sha256 "
               "(hashing reads every file once more: about 1 s per GB)")
    exit_interval: int | None = flag(None, "stop after an iteration divisible by N")
    exit_duration_in_mins: float | None = flag(None, "stop (saving first) after this long")

    def __post_init__(self) -> None:
        check_positive(self, "save_interval", "exit_interval")
        if self.save_interval and not self.save:
            raise ValueError("--save-interval needs --save DIR")


@dataclass(frozen=True)
class LoggingArgs(Section):
    title: ClassVar[str] = "logging"
    metrics_file: str | None = flag(None, "JSON lines, one per logged iteration (rank 0)")
    loss_plot: str | None = flag(None, "write a loss-curve PNG here at the end of training")
    tensorboard_dir: str | None = flag(None, "write TensorBoard event files here")
    wandb_project: str | None = flag(None, "log to this Weights & Biases project")
    wandb_exp_name: str | None = flag(None, "W&B run name")
    wandb_save_dir: str | None = flag(None, "folder for W&B's local files (default ./wandb)")
    wandb_mode: str | None = flag(None, "online, offline (sync later with `wandb sync`) or disabled; default: "
                                        "$WANDB_MODE or online", choices=WANDB_MODES)

    def __post_init__(self) -> None:
        if self.loss_plot and not self.metrics_file:
            raise ValueError("--loss-plot needs --metrics-file (the plot is drawn from it)")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelArgs, "parallel": ParallelArgs, "precision": PrecisionArgs, "optimizer": OptimizerArgs,
    "schedule": ScheduleArgs, "data": DataArgs, "tokenizer": TokenizerArgs, "training": TrainingArgs,
    "checkpoint": CheckpointArgs, "logging": LoggingArgs,
}
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters", "lr")
# Megatron-LM's pairs: an iteration-based run refuses the sample-based flags and the reverse.
_SAMPLE_BASED = {"train_samples": None, "lr_decay_samples": None, "lr_warmup_samples": 0, "lr_wsd_decay_samples": None}
_ITERATION_BASED = {"train_iters": None, "lr_decay_iters": None, "lr_warmup_iters": 0, "lr_wsd_decay_iters": None}


# ----- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """Every section of a run; ``config.<flag name>`` reads a field of whichever section has it."""

    model: ModelArgs
    parallel: ParallelArgs
    precision: PrecisionArgs
    optimizer: OptimizerArgs
    schedule: ScheduleArgs
    data: DataArgs
    tokenizer: TokenizerArgs
    training: TrainingArgs
    checkpoint: CheckpointArgs
    logging: LoggingArgs
    extra: dict[str, Section] = field(default_factory=dict)  # sections an entry point adds

    def __post_init__(self) -> None:
        later = set().union(*(section.fills_later() for section in self.extra.values()))
        if self.training.train_samples is not None:
            later.add("train_iters")  # worked out from the samples and the batch (`train_iters`)
        missing = [name for name in _REQUIRED if self._given(name) is None and name not in later]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ValueError(f"missing {flags}: give them on the command line or in --config")
        model = self.model
        if model.max_position_embeddings is None:  # a default that follows another flag
            object.__setattr__(self, "model", replace(model, max_position_embeddings=self.data.seq_length))
        elif self.data.seq_length > model.max_position_embeddings:
            raise ValueError(f"--seq-length ({self.data.seq_length}) exceeds --max-position-embeddings "
                             f"({model.max_position_embeddings})")
        tp = self.parallel.tensor_model_parallel_size
        if model.num_attention_heads % tp:
            raise ValueError(f"--num-attention-heads ({model.num_attention_heads}) must be divisible by "
                             f"--tensor-model-parallel-size ({tp})")
        if model.query_groups % tp:
            raise ValueError(f"--num-query-groups ({model.query_groups}) must be divisible by "
                             f"--tensor-model-parallel-size ({tp})")
        if self.parallel.sequence_parallel and self.data.seq_length % tp:
            raise ValueError(f"--seq-length ({self.data.seq_length}) must be divisible by "
                             f"--tensor-model-parallel-size ({tp}) with --sequence-parallel")
        if self.parallel.overlap_param_gather and not (self.parallel.use_distributed_optimizer
                                                       or self.precision.fp8_level == "O3"):
            raise ValueError("--overlap-param-gather overlaps the distributed optimizer's weight all-gathers; add "
                             "--use-distributed-optimizer (or use --fp8-level O3, whose FP8 ZeRO shards them)")
        self._check_iterations_or_samples()
        # The schedule checks itself (in the run's own unit first, so that errors name its flags).
        self.schedule.lr_schedule_config(self.training.train_iters, train_samples=self.training.train_samples)
        self.optimizer.optimizer_config(self.schedule.lr)

    def _given(self, name: str) -> Any:
        for section in self.sections().values():
            if name in section.__dataclass_fields__:
                return getattr(section, name)
        raise AttributeError(name)

    def _check_iterations_or_samples(self) -> None:
        """Iteration-based (--train-iters) or sample-based (--train-samples) training, not both
        (Megatron-LM's rule); a batch ramp-up goes with either."""
        sample_based = self.training.train_samples is not None
        if sample_based and self.training.train_iters is not None:
            raise ValueError("--train-iters and --train-samples both given; pass one (a --config file may set "
                             "train_iters: drop it there to train on samples)")
        kind, right = ("sample", "--train-samples") if sample_based else ("iteration", "--train-iters")
        for name, unset in (_ITERATION_BASED if sample_based else _SAMPLE_BASED).items():
            if self._given(name) != unset:
                other = "--" + name.replace("_", "-")
                counterpart = other.replace("iters", "samples") if sample_based else other.replace("samples", "iters")
                raise ValueError(f"{other} does not go with {kind}-based training ({right}); use {counterpart}, "
                                 "as in Megatron-LM")
        if sample_based and self.schedule.lr_warmup_fraction is not None and self.schedule.lr_warmup_samples:
            raise ValueError("--lr-warmup-fraction and --lr-warmup-samples both given; pass only one")

    @property
    def batch_schedule(self) -> BatchSchedule:
        """The global batch of each iteration (constant, or --rampup-batch-size); needs the
        world-sized config (`for_world`) for --global-batch-size's default."""
        training = self.training
        if training.global_batch_size is None:
            raise ValueError("the batch schedule needs --global-batch-size (or the launch's size: for_world)")
        rampup = tuple(training.rampup_batch_size) if training.rampup_batch_size is not None else None
        return BatchSchedule(training.global_batch_size, rampup)

    @functools.cached_property
    def train_iters(self) -> int | None:
        """--train-iters, or worked out from --train-samples and the batch schedule as Megatron-LM
        does (`BatchSchedule.iterations_for`) once the global batch is known (`for_world`)."""
        training = self.training
        if training.train_iters is not None or training.train_samples is None:
            return training.train_iters
        if training.global_batch_size is None:
            return None
        iterations = self.batch_schedule.iterations_for(training.train_samples)
        if iterations < 1:
            raise ValueError(f"--train-samples {training.train_samples} is less than one global batch "
                             f"({self.batch_schedule.global_batch_at(0)}); train on more samples")
        return iterations

    def lr_schedule_config(self) -> LRScheduleConfig:
        """The run's learning-rate schedule: in iterations, or in samples where the run is
        sample-based or its batch ramps up (Megatron-LM's scheduler counts samples)."""
        training = self.training
        ramps = training.rampup_batch_size is not None and self.batch_schedule.ramps
        return self.schedule.lr_schedule_config(
            self.train_iters, train_samples=training.train_samples,
            samples_per_iteration=training.global_batch_size if ramps else None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for section in self.sections().values():
            if name in section.__dataclass_fields__:
                return getattr(section, name)
        raise AttributeError(f"no flag or section named {name!r} in this run's configuration")

    def sections(self) -> dict[str, Section]:
        own = {name: object.__getattribute__(self, name) for name in SECTIONS}
        return {**own, **object.__getattribute__(self, "extra")}

    def flat(self) -> dict[str, Any]:
        """Every flag's value by flag name (the checkpoint's and the W&B run's record)."""
        return {f.name: getattr(section, f.name) for section in self.sections().values() for f in fields(section)}

    def for_world(self, world_size: int) -> RunConfig:
        """This config for a launch of `world_size` processes: the checks that need it, and
        --global-batch-size's default (micro batch x data-parallel size)."""
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size {tp} x "
                             f"pipeline-parallel size {pp}; launch a multiple of {tp * pp} processes or change the "
                             "parallel sizes")
        dp = world_size // (tp * pp)
        training = self.training
        global_batch = training.global_batch_size or training.micro_batch_size * dp
        if global_batch % (training.micro_batch_size * dp):
            raise ValueError(f"--global-batch-size ({global_batch}) must be a multiple of --micro-batch-size "
                             f"({training.micro_batch_size}) x data-parallel size ({dp})")
        virtual = virtual_pipeline_size(self.model.num_layers, pp, self.parallel.num_layers_per_virtual_pipeline_stage)
        rampup = tuple(training.rampup_batch_size) if training.rampup_batch_size is not None else None
        batch_sizes = BatchSchedule(global_batch, rampup).batch_sizes()  # checks the ramp
        for batch in batch_sizes:
            if batch % (training.micro_batch_size * dp):
                raise ValueError(f"--rampup-batch-size {' '.join(map(str, rampup))}: the ramp's global batch {batch} "
                                 f"is not a multiple of --micro-batch-size ({training.micro_batch_size}) x "
                                 f"data-parallel size ({dp}); make the start and the increment multiples of "
                                 f"{training.micro_batch_size * dp}")
            num_microbatches = batch // (training.micro_batch_size * dp)
            if virtual and num_microbatches % pp:
                raise ValueError(f"the interleaved schedule needs the micro-batches per step ({num_microbatches}) to "
                                 f"be a multiple of --pipeline-model-parallel-size ({pp}); change "
                                 f"--global-batch-size{' or --rampup-batch-size' if rampup else ''}")
        sized = replace(self, training=replace(training, global_batch_size=global_batch))
        sized.lr_schedule_config()  # the schedule in its final unit (a sample-based one needs the batch)
        return sized


def build_parser(description: str = "FP8-LM training", extra_sections: dict[str, type[Section]] | None = None
                 ) -> ArgumentParser:
    parser = ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of flag values; flags override it")
    for section in {**SECTIONS, **(extra_sections or {})}.values():
        section.add_to(parser)
    return parser


def _unit_of_the_command_line(defaults: dict, argv: list[str] | None) -> dict:
    """A config file's iteration-based keys (train_iters, lr_warmup_iters, ...) give way when
    the command line trains on samples (--train-samples), and its sample-based keys when the
    command line gives --train-iters: flags override the file, and a run is one or the other."""
    given = {token.split("=", 1)[0][2:].replace("-", "_") for token in (sys.argv[1:] if argv is None else argv)
             if token.startswith("--")}
    for chosen, others in (("train_samples", _ITERATION_BASED), ("train_iters", _SAMPLE_BASED)):
        if chosen in given:
            defaults = {key: value for key, value in defaults.items() if key not in others or key in given}
    return defaults


def parse_config(argv: list[str] | None = None, extra_sections: dict[str, type[Section]] | None = None,
                 description: str = "FP8-LM training") -> RunConfig:
    """The run's configuration from `argv` (and the --config file it names)."""
    parser = build_parser(description, extra_sections)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_unit_of_the_command_line(load_yaml_defaults(known.config, parser), argv))
    namespace = parser.parse_args(argv)
    built = {name: section.from_namespace(namespace) for name, section in SECTIONS.items()}
    extra = {name: section.from_namespace(namespace) for name, section in (extra_sections or {}).items()}
    return RunConfig(**built, extra=extra)
