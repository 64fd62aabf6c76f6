"""Hugging Face <-> this framework: configs and weights of LlamaForCausalLM and GPT2LMHeadModel.

Two architectures have an exact counterpart here, and only configurations that map exactly are
converted (anything else is refused with one line naming the setting):

  LlamaForCausalLM  RMSNorm, SwiGLU (fc1 = [gate; up]), non-interleaved RoPE with base rope_theta,
                    no linear biases, grouped-query attention (num_key_value_heads), head_dim,
                    tied or untied head. Refused: rope scaling of any kind, attention_bias / mlp_bias,
                    an activation other than silu.
  GPT2LMHeadModel   LayerNorm, exact (erf) GeLU, learned positions, biases, multi-head attention,
                    tied head. Conv1D weights are [in, out]; c_attn is [q of all heads | k | v].
                    Refused: activation_function other than "gelu" (gelu_new and friends are the
                    tanh approximation), scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn,
                    unscaled attention, cross-attention.

Dropout probabilities are training settings: they are carried where HF has a counterpart (Llama has
no residual dropout; GPT-2's embd_pdrop is written as, and read as, the residual dropout, since this
model drops the embeddings with --hidden-dropout).

Weights map name by name through `Rule`s (our global name <-> the HF tensors it is made of), each a
pair of exact rearrangements (concatenation, transposition, the QKV regrouping), so a round trip
reproduces every tensor bit for bit. Mapping works on the unpadded vocabulary; padding the rows to
the checkpoint's padded vocabulary (and trimming them on export) is the caller's.

Our fused QKV is laid out group by group (each query group's query heads, then its key head, then
its value head); HF keeps separate q / k / v projections, head by head, and HF's grouped-query
attention serves query head i with key/value head i // (heads / kv heads), which is the same grouping.

`transformers` and `safetensors` are imported inside the functions that need them, so the rest of
the framework works without the `hf` extra.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.config import TransformerConfig
from megatron.training.gpt_providers import model_signature
from megatron.training.inference_model import transformer_config_of

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"
ARCHITECTURES = (LLAMA, GPT2)
_MODEL_TYPES = {"llama": LLAMA, "gpt2": GPT2}
# Buffers some HF checkpoints carry that hold no weights (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require(module: str):
    """Import an optional dependency of the converter, or fail with the one line that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"the Hugging Face converter needs the '{module}' package, which is not installed; "
                         f"pip install fp8-lm[hf]") from None


# ----- configs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFModelSpec:
    """An HF model as this framework sees it: its architecture, the model flags of an identical
    GPT (ModelArgs names), its embedding rows and the dtype its weights were saved in."""

    architecture: str
    model_flags: dict
    vocab_size: int
    dtype: torch.dtype


def architecture_of(raw_config: dict, where: str = "config.json") -> str:
    """The architecture a config.json declares, if it is one this converter maps."""
    declared = raw_config.get("architectures") or []
    if declared:
        unknown = [a for a in declared if a not in ARCHITECTURES]
        if unknown or len(declared) != 1:
            raise ValueError(f"{where} declares architecture {', '.join(declared)}; this converter maps only "
                             f"{' and '.join(ARCHITECTURES)}")
        return declared[0]
    model_type = raw_config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"{where} names no architecture this converter maps (model_type {model_type!r}); "
                         f"it maps only {' and '.join(ARCHITECTURES)}")
    return _MODEL_TYPES[model_type]


def config_class(architecture: str):
    transformers = require("transformers")
    return transformers.LlamaConfig if architecture == LLAMA else transformers.GPT2Config


def _dtype_key(cls) -> str:
    """transformers 5 calls the weights' dtype `dtype`, 4 `torch_dtype` (5 warns when asked for it)."""
    return "dtype" if "dtype" in inspect.signature(cls.__init__).parameters else "torch_dtype"


def _refuse(where: str, setting: str, why: str) -> None:
    raise ValueError(f"{where}: {setting} has no exact counterpart in this framework ({why}); "
                     f"convert a model without it")


def _rope_theta(cfg, where: str) -> float:
    """rope_theta of an unscaled, whole-head RoPE (transformers 5 keeps it in rope_parameters,
    transformers 4 in rope_theta with rope_scaling beside it)."""
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        scaling = dict(getattr(cfg, "rope_scaling", None) or {})
        if scaling.get("rope_type", scaling.get("type", "default")) != "default" or \
                set(scaling) - {"rope_type", "type"}:
            _refuse(where, f"rope_scaling {scaling}", "this model's RoPE is unscaled")
        return float(getattr(cfg, "rope_theta", 10000.0))
    params = dict(params)
    theta = params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.pop("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) == 1.0:
        params.pop("partial_rotary_factor", None)
    if kind != "default" or params:
        _refuse(where, f"rope scaling {dict(rope_type=kind, **params)}", "this model's RoPE is unscaled")
    return float(theta)


def _llama_flags(cfg, where: str) -> dict:
    if cfg.hidden_act != "silu":
        _refuse(where, f"hidden_act {cfg.hidden_act!r}", "this model's SwiGLU gates with SiLU")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(cfg, name, False):
            _refuse(where, f"{name} true", "this Llama mapping has no linear biases")
    heads = cfg.num_attention_heads
    groups = cfg.num_key_value_heads or heads
    return dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=heads, group_query_attention=groups != heads,
        num_query_groups=groups if groups != heads else None,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        max_position_embeddings=cfg.max_position_embeddings, normalization="RMSNorm",
        norm_epsilon=float(cfg.rms_norm_eps), swiglu=True, position_embedding_type="rope",
        rotary_base=_rope_theta(cfg, where), hidden_dropout=0.0, attention_dropout=float(cfg.attention_dropout or 0.0),
        init_method_std=float(cfg.initializer_range),
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings, disable_bias_linear=True)


def _gpt2_flags(cfg, where: str) -> dict:
    if cfg.activation_function != "gelu":
        _refuse(where, f"activation_function {cfg.activation_function!r}",
                "this model's GeLU is the exact erf form, activation_function 'gelu'")
    if not cfg.scale_attn_weights:
        _refuse(where, "scale_attn_weights false", "attention scores are always scaled by 1/sqrt(head_dim) here")
    for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(cfg, name, False):
            _refuse(where, f"{name} true", "this model's attention has no such variant")
    if cfg.n_embd % cfg.n_head:
        _refuse(where, f"n_embd {cfg.n_embd} with n_head {cfg.n_head}", "GPT-2 heads must split n_embd evenly")
    return dict(
        num_layers=cfg.n_layer, hidden_size=cfg.n_embd, ffn_hidden_size=cfg.n_inner or 4 * cfg.n_embd,
        num_attention_heads=cfg.n_head, group_query_attention=False, num_query_groups=None,
        kv_channels=cfg.n_embd // cfg.n_head, max_position_embeddings=cfg.n_positions, normalization="LayerNorm",
        norm_epsilon=float(cfg.layer_norm_epsilon), swiglu=False, position_embedding_type="learned_absolute",
        rotary_base=10000.0, hidden_dropout=float(cfg.resid_pdrop), attention_dropout=float(cfg.attn_pdrop),
        init_method_std=float(cfg.initializer_range),
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings, disable_bias_linear=False)


def spec_from_hf_config(architecture: str, cfg, where: str = "config.json") -> HFModelSpec:
    """The GPT identical to an HF config object (of `config_class(architecture)`)."""
    flags = _llama_flags(cfg, where) if architecture == LLAMA else _gpt2_flags(cfg, where)
    dtype = getattr(cfg, _dtype_key(type(cfg)), None) or torch.float32
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype, torch.float32)
    return HFModelSpec(architecture, flags, int(cfg.vocab_size), dtype)


def read_hf_config(folder: str | Path) -> tuple[str, object]:
    """(architecture, transformers config object) of a local HF model folder; nothing is downloaded."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing; pass --hf a local folder holding an HF model (config.json and "
                         f"model.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({_first_line(exc)}); fix or replace it") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object; it is not an HF config")
    architecture = architecture_of(raw, str(path))
    try:
        cfg = config_class(architecture).from_pretrained(str(Path(folder)), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path} cannot be read by transformers ({_first_line(exc)}); fix or replace it") from None
    return architecture, cfg


def hf_architecture_for(config: TransformerConfig) -> str:
    """The HF architecture identical to our GPT, or one line naming what stands in the way."""
    llama = {"--normalization RMSNorm": config.normalization == "RMSNorm", "--swiglu": config.swiglu,
             "--position-embedding-type rope": config.position_embedding_type == "rope",
             "--disable-bias-linear": not config.add_bias_linear}
    gpt2 = {"--normalization LayerNorm": config.normalization == "LayerNorm", "no --swiglu": not config.swiglu,
            "--position-embedding-type learned_absolute": config.position_embedding_type == "learned_absolute",
            "linear biases (no --disable-bias-linear)": config.add_bias_linear,
            "no grouped-query attention": config.num_query_groups == config.num_attention_heads,
            "--kv-channels = hidden / heads": config.kv_channels * config.num_attention_heads == config.hidden_size}
    if all(llama.values()):
        return LLAMA
    if all(gpt2.values()):
        return GPT2
    # Name what is missing for the closer of the two.
    target, needs = (LLAMA, llama) if sum(llama.values()) >= sum(gpt2.values()) else (GPT2, gpt2)
    lacking = [need for need, ok in needs.items() if not ok]
    raise ValueError(f"this model has no exact Hugging Face counterpart: the closest, {target}, needs "
                     f"{', '.join(lacking)}; only {LLAMA} and {GPT2} configurations can be exported")


def hf_config_for(config: TransformerConfig, vocab_size: int, dtype: torch.dtype, *,
                  bos_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None):
    """The transformers config object of the HF model identical to our GPT with `vocab_size` rows.
    It is mapped back and compared, so a transformers version that reads it differently is caught."""
    architecture = hf_architecture_for(config)
    cls = config_class(architecture)
    tokens = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    tie = not config.untie_embeddings_and_output_weights
    if architecture == LLAMA:
        kwargs = dict(vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
                      num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
                      num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels, hidden_act="silu",
                      max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.layernorm_epsilon,
                      rope_theta=config.rotary_base, attention_bias=False, mlp_bias=False,
                      attention_dropout=config.attention_dropout, initializer_range=config.init_method_std,
                      tie_word_embeddings=tie, **tokens)
    else:
        kwargs = dict(vocab_size=vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
                      n_layer=config.num_layers, n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
                      activation_function="gelu", resid_pdrop=config.hidden_dropout, embd_pdrop=config.hidden_dropout,
                      attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.layernorm_epsilon,
                      initializer_range=config.init_method_std, scale_attn_weights=True, tie_word_embeddings=tie,
                      **tokens)
    hf_config = cls(architectures=[architecture], **kwargs, **{_dtype_key(cls): dtype})
    back = spec_from_hf_config(architecture, hf_config, "the exported config")
    if _exact_view(transformer_config_of(back.model_flags, vocab_size, torch.float32)) != \
            _exact_view(replace(config, vocab_size=vocab_size)):
        raise ValueError(f"the installed transformers reads the exported {architecture} config differently from "
                         f"this model; export with the transformers version this converter was tested with")
    return hf_config


def _exact_view(config: TransformerConfig) -> dict:
    """What two configs must share for their models to compute the same function."""
    view = model_signature(config)
    view.update(layernorm_epsilon=config.layernorm_epsilon, max_position_embeddings=config.max_position_embeddings)
    if config.position_embedding_type == "rope":
        view["rotary_base"] = config.rotary_base
    return view


# ----- weights -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensors it is made of, with the exact maps both ways."""

    ours: str
    hf: tuple[str, ...]
    to_ours: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]


def _same(ours: str, hf: str) -> Rule:
    return Rule(ours, (hf,), lambda ts: ts[0], lambda t: [t])


def _transposed(ours: str, hf: str) -> Rule:
    """GPT-2's Conv1D stores [in, out]; our linears [out, in]."""
    return Rule(ours, (hf,), lambda ts: ts[0].t(), lambda t: [t.t()])


def _qkv_maps(config: TransformerConfig):
    """Separate q / k / v rows (head by head) <-> our group-by-group fused rows (any trailing dims)."""
    groups, per_group, dim = config.num_query_groups, config.heads_per_group, config.kv_channels

    def fuse(q, k, v):
        rest = q.shape[1:]
        parts = [q.reshape(groups, per_group * dim, *rest), k.reshape(groups, dim, *rest), v.reshape(groups, dim, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def split(qkv):
        rest = qkv.shape[1:]
        q, k, v = qkv.reshape(groups, (per_group + 2) * dim, *rest).split([per_group * dim, dim, dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]

    return fuse, split


def _llama_rules(config: TransformerConfig) -> list[Rule]:
    fuse, split = _qkv_maps(config)
    rules = [_same("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             _same("decoder.final_layernorm.weight", "model.norm.weight")]
    if config.untie_embeddings_and_output_weights:
        rules.append(_same("output_layer.weight", "lm_head.weight"))
    for i in range(config.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        rules += [
            _same(ours + "input_layernorm.weight", hf + "input_layernorm.weight"),
            Rule(ours + "self_attention.linear_qkv.weight", tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"),
                 lambda ts: fuse(*ts), split),
            _same(ours + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight"),
            _same(ours + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
            Rule(ours + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                 lambda ts: torch.cat(ts, dim=0), lambda t: list(t.chunk(2, dim=0))),
            _same(ours + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight"),
        ]
    return rules


def _gpt2_rules(config: TransformerConfig) -> list[Rule]:
    fuse, split = _qkv_maps(config)
    rules = [_same("embedding.word_embeddings.weight", "transformer.wte.weight"),
             _same("embedding.position_embeddings.weight", "transformer.wpe.weight"),
             _same("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
             _same("decoder.final_layernorm.bias", "transformer.ln_f.bias")]
    if config.untie_embeddings_and_output_weights:
        rules.append(_same("output_layer.weight", "lm_head.weight"))
    for i in range(config.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        rules += [
            _same(ours + "input_layernorm.weight", hf + "ln_1.weight"),
            _same(ours + "input_layernorm.bias", hf + "ln_1.bias"),
            Rule(ours + "self_attention.linear_qkv.weight", (hf + "attn.c_attn.weight",),
                 lambda ts: fuse(*ts[0].t().chunk(3, dim=0)), lambda t: [torch.cat(split(t), dim=0).t()]),
            Rule(ours + "self_attention.linear_qkv.bias", (hf + "attn.c_attn.bias",),
                 lambda ts: fuse(*ts[0].chunk(3, dim=0)), lambda t: [torch.cat(split(t), dim=0)]),
            _transposed(ours + "self_attention.linear_proj.weight", hf + "attn.c_proj.weight"),
            _same(ours + "self_attention.linear_proj.bias", hf + "attn.c_proj.bias"),
            _same(ours + "pre_mlp_layernorm.weight", hf + "ln_2.weight"),
            _same(ours + "pre_mlp_layernorm.bias", hf + "ln_2.bias"),
            _transposed(ours + "mlp.linear_fc1.weight", hf + "mlp.c_fc.weight"),
            _same(ours + "mlp.linear_fc1.bias", hf + "mlp.c_fc.bias"),
            _transposed(ours + "mlp.linear_fc2.weight", hf + "mlp.c_proj.weight"),
            _same(ours + "mlp.linear_fc2.bias", hf + "mlp.c_proj.bias"),
        ]
    return rules


def weight_rules(architecture: str, config: TransformerConfig) -> list[Rule]:
    """Every tensor of our GPT (unpadded vocabulary: `config.vocab_size` = the HF rows) and its HF source."""
    rules = _llama_rules(config) if architecture == LLAMA else _gpt2_rules(config)
    ours = {name for name, _ in GPTModel(config, device="meta").named_parameters()}
    assert ours == {r.ours for r in rules}, sorted(ours ^ {r.ours for r in rules})
    return rules


def expected_hf_shapes(architecture: str, config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor the config implies (the maps applied to meta tensors)."""
    params = dict(GPTModel(config, device="meta").named_parameters())
    shapes = {}
    for rule in weight_rules(architecture, config):
        for name, tensor in zip(rule.hf, rule.to_hf(params[rule.ours])):
            shapes[name] = tuple(tensor.shape)
    return shapes


def _normalized_hf_names(architecture: str, state: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Drop weight-less buffers (and a tied head, which HF ties on load too); give GPT-2 base-model
    names (h.0..., as the original gpt2 files have) the GPT2LMHeadModel prefix."""
    out = {}
    bare_gpt2 = architecture == GPT2 and not any(k.startswith("transformer.") for k in state)
    for name, tensor in state.items():
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        out["transformer." + name if bare_gpt2 and name != "lm_head.weight" else name] = tensor
    return out


def hf_to_ours(architecture: str, config: TransformerConfig, state: Mapping[str, torch.Tensor],
               where: str = "the HF weights") -> dict[str, torch.Tensor]:
    """Our full tensors by global name from an HF state dict; every HF tensor must be used and fit."""
    state = _normalized_hf_names(architecture, state, not config.untie_embeddings_and_output_weights)
    shapes = expected_hf_shapes(architecture, config)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ValueError(f"{where} lack {len(missing)} tensors of this {architecture} (first: {missing[0]}); "
                         f"the weights do not belong to config.json, or a shard file is missing")
    unknown = sorted(set(state) - set(shapes))
    if unknown:
        raise ValueError(f"{where} hold {len(unknown)} tensors a plain {architecture} does not have (first: "
                         f"{unknown[0]}); this converter maps only the standard architecture")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, config.json implies {shape}; "
                             f"the weights do not belong to this config")
    return {rule.ours: rule.to_ours([state[name] for name in rule.hf]).contiguous()
            for rule in weight_rules(architecture, config)}


def ours_to_hf(architecture: str, config: TransformerConfig, ours: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF state dict (a tied head left out, as transformers saves it) from our full tensors."""
    out = {}
    for rule in weight_rules(architecture, config):
        for name, tensor in zip(rule.hf, rule.to_hf(ours[rule.ours])):
            out[name] = tensor.contiguous()
    return out


# ----- HF weight files ---------------------------------------------------------------------------
def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a local HF model folder: model.safetensors, its sharded index, or a
    pytorch_model.bin (read with weights_only)."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            files = _index_files(folder / index_name)
            break
    else:
        files = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()][:1]
    if not files:
        raise ValueError(f"{folder} holds no weights (model.safetensors, its index, or pytorch_model.bin); "
                         f"pass --hf a folder that save_pretrained wrote")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_weight_file(path))
    return state


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index} is not a valid weight index ({_first_line(exc)}); fix or replace it") from None
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path} is missing; the HF model folder is incomplete")
    try:
        if path.suffix == ".safetensors":
            return dict(require("safetensors.torch").load_file(str(path)))
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except ValueError as exc:
        if "pip install" in str(exc):
            raise
        raise ValueError(f"{path} cannot be read ({_first_line(exc)}); it is damaged") from None
    except Exception as exc:  # safetensors and torch raise assorted types for damaged files
        raise ValueError(f"{path} cannot be read ({_first_line(exc)[:200]}); it is damaged") from None


def write_hf_weights(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    save_file = require("safetensors.torch").save_file
    save_file({name: t.contiguous() for name, t in state.items()}, str(path), metadata={"format": "pt"})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
