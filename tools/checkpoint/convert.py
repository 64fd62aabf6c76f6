#!/usr/bin/env python
"""Convert between this framework's GPT checkpoints and Hugging Face models (local folders only).

    python tools/checkpoint/convert.py export --load runs/tiny/checkpoints --out hf/tiny [--dtype bf16]
    python tools/checkpoint/convert.py import --hf hf/tiny --save ckpt/tiny --tensor-model-parallel-size 2

`export` writes config.json, model.safetensors, generation_config.json (when the tokenizer is
known) and the tokenizer files (tokenizer.json or tokenizer.model with a tokenizer_config.json that
transformers loads) of the LlamaForCausalLM or GPT2LMHeadModel identical to the checkpoint's GPT;
FP8 weights are written as the values they stand for. The embedding (and untied head) keep the
rows of the true vocabulary: the source model's for a checkpoint this tool imported, else the
tokenizer's (the checkpoint run's --tokenizer-* flags, overridable here), else the padded size.

`import` writes a checkpoint at iteration 0 at the requested tensor / pipeline layout, its
vocabulary padded with zero rows as training pads it, the run flags in common.pt, the tokenizer
files copied into CKPT/tokenizer/, and CKPT/model_config.yaml: the model and tokenizer flags for
`pretrain_gpt.py --config CKPT/model_config.yaml --load CKPT --finetune ...`.

Both write into a temporary folder renamed into place at the end: a refused input (one line on
stderr, exit code 2) leaves nothing behind, and an existing non-empty folder is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import yaml  # noqa: E402

from megatron.core import checkpointing  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.parallel_state import ParallelState  # noqa: E402
from megatron.core.parallelize import global_name, materialize, parallelize_gpt  # noqa: E402
from megatron.core.pipeline_parallel.model import build_gpt_stage, virtual_pipeline_size  # noqa: E402
from megatron.core.tensor_parallel.layout import layouts_of  # noqa: E402
from megatron.core.tokenizers.tokenizer import (  # noqa: E402
    HuggingFaceTokenizer, MegatronTokenizer, SentencePieceTokenizer, build_tokenizer)
from megatron.core.checkpoint_integrity import write_manifest  # noqa: E402
from megatron.core.transformer.config import TransformerConfig  # noqa: E402
from megatron.training import hf_interop as hf  # noqa: E402
from megatron.training.config import SECTIONS  # noqa: E402
from megatron.training.gpt_providers import model_signature  # noqa: E402
from megatron.training.inference_model import (  # noqa: E402
    SavedCheckpoint, check_tensor_parallel_fits, open_checkpoint, tokenizer_config_of, transformer_config_of)
from megatron.training.resume import layout_of  # noqa: E402
from tools import OneLineErrorParser, run_cli  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Files beside a tokenizer.json / tokenizer.model that describe it to transformers.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "chat_template.json", "tokenizer.model")
TOKENIZER_FOLDER = "tokenizer"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


# ----- writing a folder whole --------------------------------------------------------------------
@contextlib.contextmanager
def staged_folder(final: Path, flag: str):
    """A temporary sibling of `final` to write into, renamed to `final` when the block succeeds
    and removed (with any parent folders made for it) when it fails."""
    final = Path(final).absolute()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ValueError(f"{flag} {final} already exists and is not empty; choose a new folder (nothing is "
                         f"overwritten)")
    made = [p for p in reversed(final.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            final.rmdir()
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(made):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


# ----- export ------------------------------------------------------------------------------------
def _checkpoint_tokenizer(saved: SavedCheckpoint, overrides: dict) -> MegatronTokenizer | None:
    """The run's tokenizer (flags overriding); None when neither names one."""
    if (overrides.get("tokenizer_type") or saved.args.get("tokenizer_type")) is None:
        return None
    return build_tokenizer(tokenizer_config_of(saved.args, **overrides))


def _vocab_rows(saved: SavedCheckpoint, tokenizer: MegatronTokenizer | None, padded: int) -> tuple[int, str]:
    """How many embedding rows to export, and why."""
    signature = saved.metadata.get("model") or {}
    imported = signature.get("unpadded_vocab_size") or (saved.common.get("hf_import") or {}).get("vocab_size")
    rows, why = (imported, "the model's vocabulary") if imported else \
        (tokenizer.vocab_size, "the tokenizer's") if tokenizer is not None else (padded, "the padded size; no tokenizer")
    if rows > padded:
        raise ValueError(f"the checkpoint's vocabulary has {padded} rows but {why} size is {rows}; pass the "
                         f"tokenizer the model was trained with (--tokenizer-type / --tokenizer-model)")
    if tokenizer is not None and tokenizer.vocab_size > rows:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model a vocabulary of {rows}; "
                         f"pass the tokenizer the model was trained with (--tokenizer-type / --tokenizer-model)")
    return rows, why


def _full_weights(saved: SavedCheckpoint, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Every parameter's whole value by global name (the single-device model's names)."""
    weights = saved.read_weights()
    names = [name for name, _ in GPTModel(config, device="meta").named_parameters()]
    extra = sorted(weights.names() - set(names))
    if extra:
        raise checkpointing.CheckpointError(f"{saved.folder} holds parameters its model flags do not describe "
                                            f"(first: {extra[0]}); the checkpoint is damaged")
    full = {}
    for name, param in GPTModel(config, device="meta").named_parameters():
        full[name] = weights.full(name)
        if tuple(full[name].shape) != tuple(param.shape):
            raise checkpointing.CheckpointError(f"{saved.folder}: {name} has shape {tuple(full[name].shape)}, its "
                                                f"model flags need {tuple(param.shape)}; the checkpoint is damaged")
    return full


def _token_ids(saved: SavedCheckpoint, tokenizer: MegatronTokenizer | None) -> dict:
    """bos / eos / pad ids for the HF config: the source model's for a checkpoint this tool
    imported, else the tokenizer's, else none."""
    imported = saved.common.get("hf_import") or {}
    if "eos_token_id" in imported:
        return {key: imported.get(key) for key in TOKEN_ID_KEYS}
    if tokenizer is None:
        return dict.fromkeys(TOKEN_ID_KEYS)
    return {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}


def export_hf_model(load_dir: str, out_dir: str, *, dtype: torch.dtype | None = None,
                    tokenizer_overrides: dict | None = None) -> str:
    """Write the HF model identical to the latest checkpoint in `load_dir`; returns a summary line."""
    hf.require("transformers")
    hf.require("safetensors")
    saved = open_checkpoint(load_dir)
    config = saved.transformer_config(torch.float32)
    architecture = hf.hf_architecture_for(config)
    tokenizer = _checkpoint_tokenizer(saved, tokenizer_overrides or {})
    rows, why = _vocab_rows(saved, tokenizer, config.vocab_size)
    dtype = dtype or saved.params_dtype()
    full = _full_weights(saved, config)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in full:
            full[name] = full[name][:rows]
    exported = replace(config, vocab_size=rows, unpadded_vocab_size=rows)
    state = {name: t.to(dtype).contiguous() for name, t in hf.ours_to_hf(architecture, exported, full).items()}
    token_ids = _token_ids(saved, tokenizer)
    hf_config = hf.hf_config_for(exported, rows, dtype, **token_ids)
    with staged_folder(Path(out_dir), "--out") as staging:
        hf_config.save_pretrained(str(staging))
        hf.write_hf_weights(state, staging / "model.safetensors")
        if token_ids["eos_token_id"] is not None:  # greedy and sampled generation stop at EOS
            hf.require("transformers").GenerationConfig(**token_ids).save_pretrained(str(staging))
        if tokenizer is not None:
            _write_tokenizer_files(tokenizer, staging, config.max_position_embeddings)
    return (f"exported iteration {saved.iteration} of {load_dir} as {architecture} ({str(dtype).replace('torch.', '')}, "
            f"{rows} vocabulary rows: {why}) to {out_dir}")


def _write_tokenizer_files(tokenizer: MegatronTokenizer, out: Path, max_length: int) -> None:
    if isinstance(tokenizer, HuggingFaceTokenizer):
        source = Path(tokenizer.model_path)
        shutil.copyfile(source, out / "tokenizer.json")
        side = [name for name in TOKENIZER_SIDE_FILES if (source.parent / name).is_file()]
        for name in side:
            shutil.copyfile(source.parent / name, out / name)
        if "tokenizer_config.json" not in side:
            _write_json(out / "tokenizer_config.json", _fast_tokenizer_config(source, tokenizer, max_length))
    elif isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(tokenizer.model_path, out / "tokenizer.model")
        _write_json(out / "tokenizer_config.json", _sentencepiece_tokenizer_config(tokenizer, max_length))
        # A tokenizer.json too, for tools that read only that: transformers' own conversion.
        loaded = hf.require("transformers").AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        if getattr(loaded, "backend_tokenizer", None) is not None:  # a slow tokenizer has no such file
            loaded.backend_tokenizer.save(str(out / "tokenizer.json"))
    # A NullTokenizer (ids as text) has no files.


def _fast_tokenizer_config(source: Path, tokenizer: MegatronTokenizer, max_length: int) -> dict:
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(source))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "eos_token": vocab.id_to_token(tokenizer.eod),
              "pad_token": vocab.id_to_token(tokenizer.pad)}
    if tokenizer.bos is not None:
        config["bos_token"] = vocab.id_to_token(tokenizer.bos)
    return config


def _sentencepiece_tokenizer_config(tokenizer: SentencePieceTokenizer, max_length: int) -> dict:
    """A LlamaTokenizer that encodes as SentencePiece does: no BOS / EOS added, and a leading
    space only where the model's normaliser adds one (transformers' `add_prefix_space`)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer.model_path)
    first = sp.encode("x", out_type=str)
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False,
              "add_prefix_space": bool(first) and first[0].startswith("\u2581"), "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "eos_token": sp.id_to_piece(sp.eos_id())}
    for key, token_id in (("bos_token", sp.bos_id()), ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
        if token_id >= 0:
            config[key] = sp.id_to_piece(token_id)
    return config


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# ----- import ------------------------------------------------------------------------------------
def _hf_folder_tokenizer(folder: Path) -> tuple[str, list[str], MegatronTokenizer] | None:
    """(tokenizer type, its files, the tokenizer) of an HF model folder; None when it has none."""
    if (folder / "tokenizer.json").is_file():
        kind, main = "HuggingFaceTokenizer", "tokenizer.json"
    elif (folder / "tokenizer.model").is_file():
        kind, main = "SentencePieceTokenizer", "tokenizer.model"
    else:
        return None
    files = [main] + [name for name in TOKENIZER_SIDE_FILES if name != main and (folder / name).is_file()]
    tokenizer = build_tokenizer(tokenizer_config_of({}, tokenizer_type=kind, tokenizer_model=str(folder / main)))
    return kind, files, tokenizer


def _padded_vocab(rows: int, tokenizer_size: int | None, divisible_by: int, tp: int) -> int:
    """Training pads the tokenizer's size; pad to the same where that covers the model's rows."""
    multiple = divisible_by * tp
    pad = lambda n: -(-n // multiple) * multiple  # noqa: E731
    return pad(tokenizer_size) if tokenizer_size and pad(tokenizer_size) >= rows else pad(rows)


def _run_flags(model_flags: dict, *, tp: int, pp: int, dtype: torch.dtype, divisible_by: int,
               tokenizer_flags: dict) -> dict:
    """Every flag of a run of this model, as training saves them (common.pt 'args')."""
    sections = {name: cls() for name, cls in SECTIONS.items()}
    sections["model"] = SECTIONS["model"](**model_flags, make_vocab_size_divisible_by=divisible_by)
    sections["parallel"] = SECTIONS["parallel"](tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    sections["precision"] = SECTIONS["precision"](bf16=dtype == torch.bfloat16)
    sections["data"] = SECTIONS["data"](seq_length=model_flags["max_position_embeddings"])
    sections["tokenizer"] = SECTIONS["tokenizer"](**tokenizer_flags)
    return {f.name: getattr(section, f.name) for section in sections.values() for f in fields(section)}


def _rank_state(tp: int, pp: int, tp_rank: int, pp_rank: int) -> ParallelState:
    """A rank's place in a layout, without processes (for writing its file)."""
    return ParallelState(world_size=tp * pp, rank=pp_rank * tp + tp_rank, tp_size=tp, pp_size=pp, dp_size=1,
                         tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=0, device=torch.device("cpu"), backend=None)


@torch.no_grad()
def write_checkpoint(root: Path, state: dict[str, torch.Tensor], config: TransformerConfig, *, tp: int, pp: int,
                     common: dict) -> None:
    """A checkpoint at iteration 0 whose rank files are those a TP x PP run (DP 1) would save."""
    folder = checkpointing.iteration_dir(root, 0)
    folder.mkdir(parents=True)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            ps = _rank_state(tp, pp, tp_rank, pp_rank)
            stage = parallelize_gpt(build_gpt_stage(config, ps, device="meta"), ps)
            materialize(stage, torch.device("cpu"))
            layouts = layouts_of(stage)
            for name, param in checkpointing.named_global_params(stage, global_name).items():
                param.copy_(layouts[param].shard(state[name], tp_rank, tp))
            torch.save(checkpointing.rank_payload(stage, None, ps, global_name), folder / f"rank_{ps.rank:05d}.pt")
    torch.save(common, folder / "common.pt")
    metadata = {"format": checkpointing.FORMAT_VERSION, "iteration": 0, "model": model_signature(config),
                "layout": layout_of(_rank_state(tp, pp, 0, 0), False), "fp8_level": "none"}
    _write_json(folder / "metadata.json", metadata)
    write_manifest(folder)  # sizes and checksums, checked when the checkpoint loads
    (root / checkpointing.MARKER).write_text("0\n")


def import_hf_model(hf_dir: str, save_dir: str, *, tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None,
                    make_vocab_size_divisible_by: int = 128) -> str:
    """Write a checkpoint of this framework holding the HF model in `hf_dir`; returns a summary."""
    hf.require("transformers")
    hf.require("safetensors")
    for name, size in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                       ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    source = Path(hf_dir)
    if not source.is_dir():
        raise ValueError(f"--hf {hf_dir} is not a folder; pass a local folder that save_pretrained wrote")
    architecture, hf_config = hf.read_hf_config(source)
    spec = hf.spec_from_hf_config(architecture, hf_config, str(source / "config.json"))
    dtype = dtype or (torch.bfloat16 if spec.dtype == torch.bfloat16 else torch.float32)
    found = _hf_folder_tokenizer(source)
    if found is not None and found[2].vocab_size > spec.vocab_size:
        raise ValueError(f"{source}'s tokenizer has {found[2].vocab_size} ids but the model only {spec.vocab_size} "
                         f"embedding rows; the tokenizer belongs to another model")
    padded = _padded_vocab(spec.vocab_size, found[2].vocab_size if found else None, make_vocab_size_divisible_by, tp)
    config, state = _converted_weights(source, spec, padded, dtype, tp, pp)
    final = Path(save_dir).absolute()
    tokenizer_flags = {}
    if found is not None:
        tokenizer_flags = {"tokenizer_type": found[0], "tokenizer_model": str(final / TOKENIZER_FOLDER / found[1][0])}
    args = _run_flags(spec.model_flags, tp=tp, pp=pp, dtype=dtype, divisible_by=make_vocab_size_divisible_by,
                      tokenizer_flags=tokenizer_flags)
    common = {"iteration": 0, "consumed_samples": 0, "skipped_iterations": 0, "args": args,
              "hf_import": {"architecture": architecture, "vocab_size": spec.vocab_size, "source": str(source.absolute()),
                            **{key: getattr(hf_config, key, None) for key in TOKEN_ID_KEYS}}}
    with staged_folder(final, "--save") as staging:
        if found is not None:
            (staging / TOKENIZER_FOLDER).mkdir()
            for name in found[1]:
                shutil.copyfile(source / name, staging / TOKENIZER_FOLDER / name)
        write_checkpoint(staging, state, config, tp=tp, pp=pp, common=common)
        (staging / "model_config.yaml").write_text(_model_config_yaml(args, spec.model_flags, tokenizer_flags))
    tokenizer_note = f"tokenizer {found[0]}" if found else "no tokenizer files (pass --tokenizer-* flags when using it)"
    return (f"imported {architecture} from {hf_dir} ({spec.vocab_size} vocabulary rows padded to {padded}, "
            f"{str(dtype).replace('torch.', '')}, {tokenizer_note}) as iteration 0 at tensor-parallel {tp} x "
            f"pipeline {pp} in {save_dir}; fine-tune with pretrain_gpt.py --config {final / 'model_config.yaml'} "
            f"--load {final} --finetune")


def _converted_weights(source: Path, spec: hf.HFModelSpec, padded: int, dtype: torch.dtype, tp: int, pp: int
                       ) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """Our GPT's config (padded vocabulary) and full tensors from the HF folder's weights, once
    the layout is known to fit."""
    try:
        unpadded = transformer_config_of(spec.model_flags, spec.vocab_size, dtype)
    except ValueError as exc:
        raise ValueError(f"{source / 'config.json'} does not describe a valid model ({exc})") from None
    config = replace(unpadded, vocab_size=padded)
    check_tensor_parallel_fits(config, tp)
    virtual_pipeline_size(config.num_layers, pp, None)  # layers must split evenly over the stages
    state = hf.hf_to_ours(spec.architecture, unpadded, hf.read_hf_weights(source), where=str(source))
    return config, {name: _pad_rows(t, padded if name in _VOCAB_ROWS else t.shape[0]).to(dtype)
                    for name, t in state.items()}


def _model_config_yaml(args: dict, model_flags: dict, tokenizer_flags: dict) -> str:
    """The flags that make pretrain_gpt.py build this model: its shape, the vocabulary padding
    (which follows the tensor-parallel size, hence that too) and the tokenizer."""
    keys = [*model_flags, "make_vocab_size_divisible_by", "tensor_model_parallel_size", *tokenizer_flags]
    flags = {key: args[key] for key in keys if args[key] is not None}
    return ("# The imported model's flags: pretrain_gpt.py --config THIS_FILE --load THIS_FOLDER --finetune plus data\n"
            "# and training flags. The padded vocabulary depends on --tensor-model-parallel-size and\n"
            "# --make-vocab-size-divisible-by; another combination that pads to the same size works too.\n"
            + yaml.safe_dump(flags, sort_keys=False))


_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows after the real ones, as training's padded vocabulary has."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


# ----- command line ------------------------------------------------------------------------------
def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description="Convert GPT checkpoints to and from Hugging Face models "
                                            "(LlamaForCausalLM, GPT2LMHeadModel); local folders only.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")
    export = commands.add_parser("export", help="checkpoint -> HF model folder")
    export.add_argument("--load", required=True, help="checkpoint folder (its latest checkpoint is exported)")
    export.add_argument("--out", required=True, help="new HF model folder to write")
    export.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype (default: the run's, bf16 with --bf16 else fp32)")
    SECTIONS["tokenizer"].add_to(export)
    imp = commands.add_parser("import", help="HF model folder -> checkpoint")
    imp.add_argument("--hf", required=True, help="local HF model folder (config.json, model.safetensors, tokenizer)")
    imp.add_argument("--save", required=True, help="new checkpoint folder to write")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary as training does (x tensor-parallel size)")
    imp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="stored weights' dtype (default: bf16 for a bf16 model, else fp32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.command == "export":
        overrides = {f.name: getattr(args, f.name) for f in fields(SECTIONS["tokenizer"])}
        print(export_hf_model(args.load, args.out, dtype=dtype, tokenizer_overrides=overrides))
    else:
        print(import_hf_model(args.hf, args.save, tp=args.tensor_model_parallel_size,
                              pp=args.pipeline_model_parallel_size, dtype=dtype,
                              make_vocab_size_divisible_by=args.make_vocab_size_divisible_by))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
