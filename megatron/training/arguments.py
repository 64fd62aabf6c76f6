"""Command line and YAML config: Megatron's flag names, loaded into typed configs.

`--config FILE.yaml` supplies defaults (keys are flag names with `_` or `-`); flags on the
command line override it. Unknown flags and unknown YAML keys are errors. All errors here are
`ValueError`s with the fix in the message; `megatron.training.cli` turns them into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from fp8.scaling import RECIPES
from megatron.core.datasets.config import add_data_args
from megatron.core.pipeline_parallel.model import virtual_pipeline_size
from megatron.core.precision import LEVELS, FP8Config
from megatron.core.tokenizers.tokenizer import add_tokenizer_args
from megatron.training.lr_schedule import add_lr_schedule_args, lr_schedule_config_from_args, schedule_mismatch_policy


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str):
        raise ValueError(f"{message} (see --help)")


def _model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups key/value heads (default 1), as Megatron-LM")
    g.add_argument("--num-query-groups", type=int, default=None, help="needs --group-query-attention")
    g.add_argument("--kv-channels", type=int, default=None, help="head dimension; default hidden / heads")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--position-embedding-type", default="learned_absolute", choices=["learned_absolute", "rope"])
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)


def _training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="BF16 parameters and activations (FP32 masters)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)


def _parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: layers per model chunk (several chunks per stage)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")


def _checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="folder to write checkpoints to")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--load", default=None, help="folder to resume from (its latest checkpoint)")
    g.add_argument("--finetune", action="store_true", help="load weights only: fresh optimizer, iteration 0")
    g.add_argument("--no-load-optim", action="store_true", help="do not load the optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load the random-number states")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after an iteration divisible by N")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, help="stop (saving first) after this long")


def _recompute_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)


def _fp8_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fp8")
    g.add_argument("--fp8-level", default="none", choices=list(LEVELS))
    g.add_argument("--fp8-format", default="hybrid", choices=["hybrid", "e4m3"])
    g.add_argument("--fp8-recipe", default="delayed", choices=list(RECIPES))
    g.add_argument("--fp8-amax-history-len", type=int, default=1024)
    g.add_argument("--fp8-amax-compute-algo", default="max", choices=["max", "most_recent"])
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-min-features", type=int, default=128,
                   help="linears narrower than this (per rank) stay in high precision")
    g.add_argument("--fp8-output-layer", action="store_true", help="FP8 GEMMs in the output head too")
    g.add_argument("--fp8-wgrad-auto-scaling", action=argparse.BooleanOptionalAction, default=True,
                   help="O1+: adapt the gradient pre-scaling factor mu (FP8-LM 2.1); off: divide by DP first")
    g.add_argument("--fp8-wgrad-auto-scaling-ratio", type=float, default=1e-5,
                   help="overflow fraction above which mu halves")
    g.add_argument("--fp8-wgrad-auto-scaling-window", type=int, default=1000,
                   help="steps below the ratio after which mu doubles (up to 2)")
    g.add_argument("--main-params-dtype", default=None, choices=["fp32", "fp16"],
                   help="O1+: master of the FP8 linear weights (default fp16 with a per-tensor scale)")
    g.add_argument("--exp-avg-dtype", default=None, choices=["fp32", "fp16", "bf16", "fp8"],
                   help="Adam first moment of the FP8 linear weights (default: fp32 at O1, fp8 at O2)")
    g.add_argument("--exp-avg-sq-dtype", default=None, choices=["fp32", "fp16", "bf16", "fp8"],
                   help="Adam second moment of the FP8 linear weights (default: fp32 at O1, fp16 at O2)")
    g.add_argument("--fp16-master-stochastic-rounding", action="store_true",
                   help="round FP16 master updates stochastically (long runs, small late updates)")
    g.add_argument("--fp8-reduce-scatter", action=argparse.BooleanOptionalAction, default=None,
                   help="O3 with --sequence-parallel: the backward reduce-scatter of input gradients in FP8 "
                        "(default: the level's choice, see README)")
    g.add_argument("--fp8-pipeline-p2p", action=argparse.BooleanOptionalAction, default=None,
                   help="pipeline sends in FP8: activations E4M3, gradients E5M2, with scales "
                        "(default: the level's choice, see README)")


def _logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--metrics-file", default=None, help="JSON lines, one per logged iteration (rank 0)")
    g.add_argument("--loss-plot", default=None, help="write a loss-curve PNG here at the end of training")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])


def build_parser(description: str = "FP8-LM training", extra_args_provider=None) -> ArgumentParser:
    parser = ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of flag values; flags override it")
    _model_args(parser)
    _training_args(parser)
    _parallel_args(parser)
    _fp8_args(parser)
    _logging_args(parser)
    _checkpoint_args(parser)
    _recompute_args(parser)
    add_lr_schedule_args(parser)
    add_data_args(parser)
    add_tokenizer_args(parser)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """The YAML file's values keyed by argparse dest; unknown keys are an error."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in dests or dest == "config":
            raise ValueError(f"--config {path}: unknown key {key!r}; keys are flag names such as num_layers")
        defaults[dest] = value
    return defaults


def parse_args(argv: list[str] | None = None, extra_args_provider=None) -> argparse.Namespace:
    parser = build_parser(extra_args_provider=extra_args_provider)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_yaml_defaults(known.config, parser))
    args = parser.parse_args(argv)
    _fill_defaults(args)
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    required = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters", "lr")
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ValueError(f"missing {flags}: give them on the command line or in --config")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.num_query_groups is not None and not args.group_query_attention:
        raise ValueError(f"--num-query-groups {args.num_query_groups} takes effect only with --group-query-attention "
                         "(as in Megatron-LM); add --group-query-attention or drop --num-query-groups")
    if args.num_query_groups is None:
        args.num_query_groups = 1 if args.group_query_attention else args.num_attention_heads


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Everything that must hold before any work starts; one ValueError naming the fix."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size {tp} x pipeline-parallel "
                         f"size {pp}; launch a multiple of {tp * pp} processes or change the parallel sizes")
    dp = world_size // (tp * pp)
    if args.num_attention_heads % tp:
        raise ValueError(f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
                         f"--tensor-model-parallel-size ({tp})")
    if args.num_query_groups % tp:
        raise ValueError(f"--num-query-groups ({args.num_query_groups}) must be divisible by "
                         f"--tensor-model-parallel-size ({tp})")
    if args.sequence_parallel and args.seq_length % tp:
        raise ValueError(f"--seq-length ({args.seq_length}) must be divisible by --tensor-model-parallel-size "
                         f"({tp}) with --sequence-parallel")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.micro_batch_size < 1 or args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size ({args.global_batch_size}) must be a multiple of --micro-batch-size "
                         f"({args.micro_batch_size}) x data-parallel size ({dp})")
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings "
                         f"({args.max_position_embeddings})")
    for name in ("train_iters", "log_interval", "eval_interval", "save_interval", "exit_interval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.save_interval and not args.save:
        raise ValueError("--save-interval needs --save DIR")
    virtual = virtual_pipeline_size(args.num_layers, pp, args.num_layers_per_virtual_pipeline_stage)
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if virtual and num_microbatches % pp:
        raise ValueError(f"the interleaved schedule needs the micro-batches per step ({num_microbatches}) to be a "
                         f"multiple of --pipeline-model-parallel-size ({pp}); change --global-batch-size")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron: nothing to split
    # The typed configs check themselves; build them now so that their errors, too, come before
    # any process group exists.
    lr_schedule_config_from_args(args)
    schedule_mismatch_policy(args)
    from megatron.training.gpt_providers import transformer_config_from_args
    fp8_config_from_args(args)
    transformer_config_from_args(args, vocab_size=1)


def fp8_config_from_args(args: argparse.Namespace) -> FP8Config:
    return FP8Config(level=args.fp8_level, format=args.fp8_format, recipe=args.fp8_recipe,
                     amax_history_len=args.fp8_amax_history_len, amax_compute_algo=args.fp8_amax_compute_algo,
                     margin=args.fp8_margin, min_features=args.fp8_min_features, output_layer=args.fp8_output_layer,
                     wgrad_auto_scaling=args.fp8_wgrad_auto_scaling,
                     wgrad_auto_scaling_ratio=args.fp8_wgrad_auto_scaling_ratio,
                     wgrad_auto_scaling_window=args.fp8_wgrad_auto_scaling_window,
                     main_params_dtype=args.main_params_dtype, exp_avg_dtype=args.exp_avg_dtype,
                     exp_avg_sq_dtype=args.exp_avg_sq_dtype,
                     fp16_master_stochastic_rounding=args.fp16_master_stochastic_rounding,
                     reduce_scatter=args.fp8_reduce_scatter, pipeline_p2p=args.fp8_pipeline_p2p)


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Pad so that every tensor-parallel shard of the vocabulary has a multiple of
    --make-vocab-size-divisible-by rows (Megatron's rule)."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    if multiple < 1:
        raise ValueError("--make-vocab-size-divisible-by must be >= 1")
    return int(math.ceil(vocab_size / multiple) * multiple)
