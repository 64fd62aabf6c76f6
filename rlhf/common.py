"""What every RLHF entry point shares: the models it starts from must speak the run's tokenizer,
and preference or prompt files are rendered with one chat template."""

from __future__ import annotations

import hashlib
from pathlib import Path

from megatron.core.datasets.chat_template import ChatTemplate, load_chat_template
from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer
from megatron.training.inference_model import open_checkpoint, tokenizer_config_of


def tokenizer_fingerprint(config: TokenizerConfig) -> dict:
    """What decides the meaning of token ids: the type, the vocabulary size and the model file's bytes
    (so a copy of the same file elsewhere matches, and a retrained one with the same size does not)."""
    tokenizer = build_tokenizer(config)
    digest = None
    if config.tokenizer_model:
        path = Path(config.tokenizer_model)
        target = path if path.is_file() else None
        if path.is_dir():  # a Hugging Face folder: its tokenizer files
            names = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
            files = [path / n for n in names if (path / n).is_file()]
            digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else None
        elif target is not None:
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
    return {"type": config.tokenizer_type, "vocab_size": tokenizer.vocab_size, "sha256": digest}


def check_same_tokenizer(run: TokenizerConfig, checkpoints: dict[str, str | None]) -> None:
    """Refuse (one line) a model whose checkpoint was trained with another tokenizer than the run's:
    `checkpoints` maps a role ("reference model", ...) to its folder (None: not used)."""
    mine = tokenizer_fingerprint(run)
    for role, folder in checkpoints.items():
        if not folder:
            continue
        saved = open_checkpoint(folder)
        try:
            theirs = tokenizer_fingerprint(tokenizer_config_of(saved.args))
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise ValueError(f"the {role} in {folder} names a tokenizer that cannot be loaded ({exc}); "
                             f"keep its tokenizer file where its run found it") from None
        if theirs != mine:
            diff = [k for k in mine if mine[k] != theirs[k]]
            raise ValueError(f"the {role} in {folder} was trained with another tokenizer ({diff[0]}: "
                             f"{theirs[diff[0]]} vs this run's {mine[diff[0]]}); pass the --tokenizer-* flags of "
                             f"that run, or models trained with this tokenizer")


FP8_CASTING_FLAGS = ("fp8_format", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin",
                     "fp8_min_features", "fp8_output_layer")


def fp8_settings_of(config) -> dict:
    """The run's FP8 casting flags, for the frozen models it loads (`load_gpt_for_inference`'s
    `fp8_settings`): they cast as the trained model does."""
    return {name: getattr(config.precision, name) for name in FP8_CASTING_FLAGS}


def chat_template_for(tokenizer_config: TokenizerConfig, choice: str = "auto") -> ChatTemplate:
    return load_chat_template(build_tokenizer(tokenizer_config), choice)
