"""What every RLHF entry point shares: the models it starts from must speak the run's tokenizer,
and preference or prompt files are rendered with one chat template."""

from __future__ import annotations

from megatron.core.datasets.chat_template import ChatTemplate, load_chat_template
from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer, tokenizer_fingerprint
from megatron.training.inference_model import open_checkpoint, tokenizer_config_of


def check_same_tokenizer(run: TokenizerConfig, checkpoints: dict[str, str | None]) -> None:
    """Refuse (one line) a model whose checkpoint was trained with another tokenizer than the run's:
    `checkpoints` maps a role ("reference model", ...) to its folder (None: not used)."""
    mine = tokenizer_fingerprint(run)
    for role, folder in checkpoints.items():
        if not folder:
            continue
        saved = open_checkpoint(folder)
        try:
            # What the run that saved it recorded; else its tokenizer flags' file as it is now.
            theirs = saved.metadata.get("tokenizer") or tokenizer_fingerprint(tokenizer_config_of(saved.args))
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
    `fp8_settings`): they cast as the trained model does. A flag the run leaves to be worked out
    (None: --fp8-min-features auto before the trainer resolves it) keeps the checkpoint's value."""
    settings = {name: getattr(config.precision, name) for name in FP8_CASTING_FLAGS}
    return {name: value for name, value in settings.items() if value is not None}


def chat_template_for(tokenizer_config: TokenizerConfig, choice: str = "auto") -> ChatTemplate:
    return load_chat_template(build_tokenizer(tokenizer_config), choice)
