"""A GPT checkpoint of this framework, loaded for inference (text generation, evaluation, export).

    loaded = load_gpt_for_inference("runs/tiny/checkpoints", ps)    # ps: tensor-parallel, pipeline 1
    logits = loaded.model(input_ids)                               # [b, s, padded vocab / tp]
    tokenizer = build_tokenizer(tokenizer_config_of(loaded.args))

The latest checkpoint in the folder is read whatever layout (TP / PP / DP, distributed optimizer
or not) and precision level wrote it: its metadata names the layout, its common file the run's
flags, and each parameter's value is stored under its global name with how it was cut (see
`megatron.core.checkpointing`). The model is rebuilt at the caller's tensor-parallel size and every
parameter takes its shard of the saved value. Only the model part of the data-parallel rank 0
files is read (memory-mapped, so the optimizer states beside it are never paged in), and only
this rank's tensor-parallel files when the saved tensor-parallel size is the caller's.

FP8 and scaled-FP16 parameters are saved as the values they stand for, so an O3 checkpoint gives
a high-precision model (`params_dtype`, by default the run's: BF16 with --bf16, else FP32) unless
`fp8_level` asks for FP8 GEMMs, or at O3 for FP8 weights read as stored. Logits at tensor-parallel size > 1 are vocab-parallel (each
rank holds its slice of the padded vocabulary); gather them over the "tp" group.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from fp8.params import is_fp8_param, set_param_value
from megatron.core import checkpointing
from megatron.core.checkpointing import CheckpointError
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name, materialize, parallelize_gpt
from megatron.core.precision import LEVELS, FP8Config, apply_inference_precision
from megatron.core.tensor_parallel.layout import layouts_of
from megatron.core.tokenizers.tokenizer import TokenizerConfig
from megatron.core.transformer.config import TransformerConfig
from megatron.training.config import ModelArgs
from megatron.training.flags import TokenizerArgs
from megatron.training.gpt_providers import model_signature, transformer_config

_REQUIRED_MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


@dataclass
class LoadedModel:
    model: GPTModel            # this rank's tensor-parallel shard, pipeline size 1, eval() mode, weights loaded
    config: TransformerConfig  # of the checkpoint (vocab_size = the padded vocabulary it was saved with)
    args: dict                 # the flat flags the checkpoint's run used (common.pt "args")
    iteration: int
    fp8_level: str             # the level the checkpoint was trained at (metadata)


# ----- the saved checkpoint ----------------------------------------------------------------------
@dataclass
class SavedCheckpoint:
    """The latest checkpoint of a folder: where it is, its metadata and its common file."""

    root: Path
    iteration: int
    metadata: dict
    common: dict
    manifest: dict | None = None  # file sizes and checksums; None for a checkpoint saved before manifests

    @property
    def folder(self) -> Path:
        return checkpointing.iteration_dir(self.root, self.iteration)

    @property
    def args(self) -> dict:
        return self.common["args"]

    @property
    def fp8_level(self) -> str:
        return str(self.metadata.get("fp8_level") or self.args.get("fp8_level") or "none")

    def params_dtype(self) -> torch.dtype:
        """The dtype the run kept its weights in."""
        return torch.bfloat16 if self.args.get("bf16") else torch.float32

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary (ids); its embedding's rows may pad it."""
        return checkpointing.recorded_vocab_size(self.metadata, self.common)

    def transformer_config(self, params_dtype: torch.dtype | None = None) -> TransformerConfig:
        """The saved GPT's shape (padded vocabulary), checked against the metadata's signature (an
        actor-critic checkpoint's: its actor's)."""
        signature = self.metadata.get("model") or {}
        if isinstance(signature.get("actor"), dict):
            signature = signature["actor"]
        if "vocab_size" not in signature:
            raise CheckpointError(f"{self.folder}/metadata.json does not record the model's vocab_size; it was not "
                                  f"written by a GPT run of this framework - load a checkpoint that pretrain_gpt.py saved")
        try:
            config = transformer_config_of(self.args, signature["vocab_size"], params_dtype or self.params_dtype(),
                                           unpadded_vocab_size=self.vocab_size)
        except ValueError as exc:
            raise CheckpointError(f"{self.folder}/common.pt holds model flags that do not make a GPT "
                                  f"({_first_line(exc)}); the checkpoint is damaged") from None
        for key, value in model_signature(config).items():
            if key in signature and signature[key] != value:
                raise CheckpointError(f"{self.folder}: metadata.json says {key}={signature[key]!r} but the run's flags "
                                      f"give {value!r}; the checkpoint is damaged")
        return config

    def weight_ranks(self, tp_ranks: list[int] | None = None) -> list[int]:
        """The global ranks whose files hold the model: data-parallel rank 0 of every stage, only
        the saved tensor-parallel ranks `tp_ranks` when given."""
        layout = self.metadata["layout"]
        tp, dp, pp = layout["tp"], layout["dp"], layout["pp"]
        wanted = range(tp) if tp_ranks is None else tp_ranks
        return [pp_rank * dp * tp + tp_rank for pp_rank in range(pp) for tp_rank in wanted]

    def read_weights(self, tp_ranks: list[int] | None = None) -> ModelWeights:
        ranks = self.weight_ranks(tp_ranks)
        checkpointing.check_file_sizes(self.folder, self.manifest, {f"rank_{r:05d}.pt" for r in ranks})
        return ModelWeights(self.folder, ranks)


def open_checkpoint(load_dir: str | Path) -> SavedCheckpoint:
    """The latest checkpoint in `load_dir`, with one-line errors naming the fix."""
    root = Path(load_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"checkpoint folder {root} is a file; pass the folder that --save wrote")
    if not root.is_dir():
        raise ValueError(f"checkpoint folder {root} does not exist; pass the folder that --save wrote")
    iteration = checkpointing.latest_iteration(str(root))
    if iteration is None:
        raise CheckpointError(f"{root} holds no checkpoint ({checkpointing.MARKER} is missing); pass the folder "
                              f"that --save wrote, or let a run save one first")
    folder = checkpointing.iteration_dir(root, iteration)
    # Sizes of the files read, checksums of the small ones: the rank files are memory-mapped and
    # only their model part is read, so hashing them whole would cost more than the load.
    manifest = checkpointing.read_manifest(folder)
    checkpointing.check_file_sizes(folder, manifest, {"metadata.json", "common.pt"})
    metadata = checkpointing.read_metadata(str(root), iteration, manifest)
    if metadata.get("format") != checkpointing.FORMAT_VERSION:
        raise CheckpointError(f"{folder} has checkpoint format {metadata.get('format')}, this version reads "
                              f"{checkpointing.FORMAT_VERSION}; load it with the version that wrote it")
    layout = metadata.get("layout")
    if not isinstance(layout, dict) or not all(isinstance(layout.get(k), int) for k in ("tp", "pp", "dp")):
        raise CheckpointError(f"{folder}/metadata.json does not record the parallel layout; the checkpoint is damaged")
    common = checkpointing.safe_load(folder / "common.pt", manifest)
    if not isinstance(common, dict) or not isinstance(common.get("args"), dict):
        raise CheckpointError(f"{folder}/common.pt holds no run flags ('args'); it was not written by a run of "
                              f"this framework, or it is damaged")
    return SavedCheckpoint(root, iteration, metadata, common, manifest)


def _load_mapped(path: Path) -> dict:
    """A rank file, memory-mapped: what is never touched (the optimizer states) is never read."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, load another one")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated zip, a refused global, ...
        raise CheckpointError(f"{path} cannot be loaded safely ({_first_line(exc)[:200]}); it is damaged or "
                              f"not a checkpoint this framework wrote") from None
    if not isinstance(payload, dict) or payload.get("format") != checkpointing.FORMAT_VERSION \
            or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path} is not a rank file of checkpoint format {checkpointing.FORMAT_VERSION}; "
                              f"load it with the version that wrote it")
    return payload


class ModelWeights(checkpointing.ShardedCheckpoint):
    """The model part of some rank files of one checkpoint. Unlike its parent, which loads whole
    files to restore training, it maps them and touches only the model's tensors."""

    def __init__(self, folder: Path, ranks: list[int]):  # replaces the parent's eager loading
        self.folder = folder
        self.payloads = [_load_mapped(folder / f"rank_{r:05d}.pt") for r in ranks]

    def saved_shard(self, name: str) -> dict:
        for payload in self.payloads:
            if name in payload["model"]:
                return payload["model"][name]["shard"]
        raise CheckpointError(f"{self.folder} lacks the parameter {name}; the checkpoint is incomplete or of "
                              f"another model")

    def full(self, name: str) -> torch.Tensor:
        """The whole (unsharded) saved value."""
        self.saved_shard(name)  # a clear error when it is missing
        try:
            return self.full_tensor(name)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.folder}: the pieces of {name} do not fit together ({_first_line(exc)}); "
                                  f"a rank file is missing or damaged") from None

    def local(self, name: str, layout, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This rank's shard under `layout` at tensor-parallel size `tp_size`."""
        saved = self.saved_shard(name)
        same_cut = saved["tp_size"] == tp_size and saved["dim"] == layout.tp_dim and saved["parts"] == layout.tp_parts
        if same_cut and tp_size > 1:  # the saved piece of our rank is our shard
            for payload in self.payloads:
                entry = payload["model"].get(name)
                if entry is not None and entry["shard"]["tp_rank"] == tp_rank:
                    return entry["tensor"]
        return layout.shard(self.full(name), tp_rank, tp_size)


# ----- the model ---------------------------------------------------------------------------------
def transformer_config_of(args: dict, vocab_size: int, params_dtype: torch.dtype, *,
                          unpadded_vocab_size: int | None = None) -> TransformerConfig:
    """The GPT that a run with these flat flags builds for a (padded) vocabulary of `vocab_size`
    rows, the first `unpadded_vocab_size` its vocabulary (default all): the same mapping as
    training (`gpt_providers.transformer_config`)."""
    missing = [name for name in _REQUIRED_MODEL_FLAGS if args.get(name) is None]
    if missing:
        raise ValueError(f"the run's flags lack {', '.join('--' + m.replace('_', '-') for m in missing)}")
    model = ModelArgs(**{f.name: args[f.name] for f in fields(ModelArgs) if f.name in args})
    run = SimpleNamespace(model=model, precision=SimpleNamespace(params_dtype=params_dtype))
    return transformer_config(run, vocab_size, unpadded_vocab_size)


def check_tensor_parallel_fits(config: TransformerConfig, tp_size: int) -> None:
    """One line naming what a tensor-parallel size does not divide, before anything is built."""
    sizes = {"attention heads": config.num_attention_heads, "query groups": config.num_query_groups,
             "FFN hidden size": config.ffn_hidden_size, "padded vocabulary": config.vocab_size}
    for what, size in sizes.items():
        if size % tp_size:
            raise ValueError(f"tensor-parallel size {tp_size} does not divide the model's {size} {what}; "
                             f"use a --tensor-model-parallel-size that divides {size}")


def load_gpt_for_inference(load_dir: str, ps: ParallelState, *, params_dtype: torch.dtype | None = None,
                           fp8_level: str | None = "none", fp8_recipe: str | None = None,
                           fp8_settings: dict | None = None) -> LoadedModel:
    """The latest checkpoint in `load_dir` as this rank's shard of an eval-mode GPT at `ps`'s
    tensor-parallel size (pipeline size 1), weights in `params_dtype` (default: the run's).

    `fp8_level`: the GEMMs to run (`apply_inference_precision`): "none" (default) high precision,
    O0-O2 FP8 GEMMs on high-precision weights, O3 FP8 weights (one byte each, cast from each
    loaded value as it is read, so no high-precision copy of them exists); None means the level the
    checkpoint was trained at. `fp8_recipe`: the scaling recipe (default: the run's). `fp8_settings`:
    casting flags by their names (fp8_format, fp8_min_features, ...) that replace the saved run's,
    e.g. those of the run that uses this model as a frozen reference."""
    if ps.pp_size > 1:
        raise ValueError(f"inference loads the whole model on every rank, but the pipeline size is {ps.pp_size}; "
                         f"use --pipeline-model-parallel-size 1 (tensor parallelism splits a large model)")
    saved = open_checkpoint(load_dir)
    config = saved.transformer_config(params_dtype)
    # Inference never recomputes activations or drops values.
    config = replace(config, recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    check_tensor_parallel_fits(config, ps.tp_size)
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    materialize(model, ps.device)
    level = saved.fp8_level if fp8_level is None else fp8_level
    if level not in LEVELS:
        raise ValueError(f"unknown FP8 level {level!r}; use one of {', '.join(LEVELS)}")
    apply_inference_precision(model, inference_fp8_config(dict(saved.args, **(fp8_settings or {})), level, fp8_recipe))
    load_gpt_weights(model, saved, ps)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, config=config, args=dict(saved.args), iteration=saved.iteration,
                       fp8_level=saved.fp8_level)


def inference_fp8_config(args: dict, level: str, recipe: str | None) -> FP8Config:
    """The run's casting settings (format, recipe, margin, size filter, head) at `level`. A
    delayed-scaling run generates with current scaling: a history of earlier calls' amaxes would
    make each answer depend on what was generated before it."""
    defaults = FP8Config(level="none")
    recipe = recipe or args.get("fp8_recipe") or defaults.recipe
    return FP8Config(level=level, recipe="current" if recipe == "delayed" else recipe,
                     format=args.get("fp8_format") or defaults.format,
                     amax_history_len=args.get("fp8_amax_history_len") or defaults.amax_history_len,
                     amax_compute_algo=args.get("fp8_amax_compute_algo") or defaults.amax_compute_algo,
                     margin=args.get("fp8_margin") or defaults.margin,
                     min_features=_or(args.get("fp8_min_features"), defaults.min_features),
                     output_layer=bool(args.get("fp8_output_layer")))


def _or(value, default):
    return default if value is None else value


def policy_prefix(saved: SavedCheckpoint) -> str:
    """Where a checkpoint keeps its GPT: at the top, or under `actor.` in an RLHF run's actor-critic
    pair (rlhf/train_ppo.py)."""
    return "actor." if "actor" in (saved.metadata.get("model") or {}) else ""


def load_gpt_weights(model: GPTModel, checkpoint: str | Path | SavedCheckpoint, ps: ParallelState) -> None:
    """Every weight of `model` (a GPT laid out for `ps`, pipeline size 1) from the latest checkpoint
    in a folder (or an opened one), resharded to `ps`'s tensor-parallel size."""
    saved = checkpoint if isinstance(checkpoint, SavedCheckpoint) else open_checkpoint(checkpoint)
    same_tp = saved.metadata["layout"]["tp"] == ps.tp_size
    _load_weights(model, saved.read_weights([ps.tp_rank] if same_tp else None), ps, prefix=policy_prefix(saved))


@torch.no_grad()
def _load_weights(model: GPTModel, weights: ModelWeights, ps: ParallelState, prefix: str = "") -> None:
    params = checkpointing.named_global_params(model, global_name)
    extra = sorted({n[len(prefix):] for n in weights.names() if n.startswith(prefix)} - set(params))
    if extra:
        raise CheckpointError(f"{weights.folder} holds {len(extra)} parameters this model lacks (first: {extra[0]}); "
                              f"its metadata does not describe its weights - the checkpoint is damaged")
    layouts = layouts_of(model)
    for name, param in params.items():
        tensor = weights.local(prefix + name, layouts[param], ps.tp_rank, ps.tp_size)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{weights.folder}: {name} has shape {tuple(tensor.shape)}, the model its flags "
                                  f"describe needs {tuple(param.shape)}; the checkpoint is damaged")
        if not checkpointing.all_finite(tensor):
            raise CheckpointError(f"{weights.folder}: {prefix + name} holds NaN or infinite values (the run had "
                                  f"diverged when it was saved); load an earlier checkpoint")
        if is_fp8_param(param):
            set_param_value(param, tensor.to(device=param.device))
        else:
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    model.tie_output_weight()


# ----- the tokenizer -----------------------------------------------------------------------------
def tokenizer_config_of(args: dict, **overrides) -> TokenizerConfig:
    """The tokenizer the checkpoint's run used (its --tokenizer-* flags); keyword arguments named
    as those flags (tokenizer_type, tokenizer_model, vocab_size) override them, None meaning not given."""
    names = [f.name for f in fields(TokenizerArgs)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unknown tokenizer override {unknown[0]!r}; use one of {', '.join(names)}")
    values = {name: args.get(name) for name in names}
    values.update({name: value for name, value in overrides.items() if value is not None})
    return TokenizerArgs(**values).tokenizer_config()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
