"""What a run checks before any work or write: the paths it reads and writes, and the data it
trains on against its tokenizer (DESIGN.md: bad input ends in one line naming the fix, exit 2,
and nothing on disk changes).

`check_paths(config)` runs in `setup_parallel` on every rank, before the process group exists,
so a problem ends every rank at once with the same line.

`--load` follows Megatron-LM's habit of passing one folder as both `--load` and `--save`: a run
whose `--load` is its `--save` folder starts fresh when that folder does not exist yet or holds
no checkpoint. Any other `--load` must hold a checkpoint: a typo in the path, a file, or an empty
folder is an error, not a silent start from scratch; checkpoint folders without their
`latest_checkpointed_iteration.txt` are refused (a fresh start would save over them).
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron.core import checkpointing
from megatron.core.datasets.config import parse_data_path
from megatron.core.datasets.indexed_dataset import IndexedDataset, dataset_exists
from megatron.core.tokenizers.tokenizer import build_tokenizer

# SFT data (tools/preprocess_sft.py) is PREFIX_tokens_document beside PREFIX_loss_mask_document.
_SFT_TOKENS_SUFFIX = "_tokens_document"


def check_paths(config) -> None:
    """Every path of the run usable for what it is (see the module docstring), and the data's
    token ids inside the tokenizer's vocabulary."""
    checkpoint, logging = config.checkpoint, config.logging
    check_load(checkpoint.load, checkpoint.save)
    check_output_folder("--save", checkpoint.save)
    check_output_folder("--data-cache-path", config.data.data_cache_path, writable=False)  # unwritable: kept in memory
    if _rank() == 0:  # what only global rank 0 writes
        check_output_file("--metrics-file", logging.metrics_file)
        check_output_file("--loss-plot", logging.loss_plot)
        check_output_folder("--tensorboard-dir", logging.tensorboard_dir)
        check_output_folder("--wandb-save-dir", logging.wandb_save_dir)
    check_data_tokens(config)


def check_load(load: str | None, save: str | None) -> None:
    if not load:
        return
    path = Path(load)
    resumes_own_save = save is not None and os.path.realpath(load) == os.path.realpath(save)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--load {load} is a file, not a checkpoint folder; pass the folder that --save wrote "
                         f"(it holds {checkpointing.MARKER})")
    if not path.exists():
        if resumes_own_save:
            return  # the first run of a job that saves and resumes in one folder
        raise ValueError(f"--load {load} does not exist; check the path, or drop --load to start from scratch (to "
                         f"resume where this run saves, pass the --save folder as --load)")
    # A damaged marker, or checkpoint folders without one: one line naming the file and the fix.
    iteration = checkpointing.latest_iteration(load)
    if iteration is None and not resumes_own_save:
        raise ValueError(f"--load {load} holds no checkpoint ({checkpointing.MARKER} is missing); pass the folder "
                         f"that --save wrote, or drop --load to start from scratch")


def check_output_folder(flag: str, folder: str | None, *, writable: bool = True) -> None:
    """`folder` is, or can be made as, a folder this process may write into."""
    if not folder:
        return
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder; pass a folder (or move the file away)")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder} cannot be made: {existing} is a file; choose another path")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: {existing} is not writable; choose a folder you can write to")


def check_output_file(flag: str, file: str | None) -> None:
    """`file` is, or can be made as, a file this process may write."""
    if not file:
        return
    path = Path(file)
    if path.is_dir():
        raise ValueError(f"{flag} {file} is a folder; give a file path, e.g. {path / 'metrics.jsonl'}"
                         if flag == "--metrics-file" else f"{flag} {file} is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {file} is not writable; choose another path")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"{flag} {file} cannot be written: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {file}: {existing} is not writable; choose another path")


def check_data_tokens(config) -> None:
    """The token ids of every indexed dataset `--data-path` names lie inside the tokenizer's
    vocabulary (ids beyond it would crash the embedding, or on a vocab-parallel embedding be
    silently zero). Cheap: the range is recorded in the index, or scanned once and cached."""
    data_path = config.data.data_path
    if not data_path:
        return
    try:
        tokenizer_config = config.tokenizer.tokenizer_config()
    except ValueError:
        return  # no tokenizer given: the entry point that needs one says so
    prefixes = [prefix for prefix, _ in parse_data_path(list(data_path))]
    indexed = [candidate for prefix in prefixes for candidate in (prefix, prefix + _SFT_TOKENS_SUFFIX)
               if dataset_exists(candidate)]
    if not indexed:
        return  # not indexed data (DPO's JSON lines), or missing: its reader names the fix
    vocab_size = build_tokenizer(tokenizer_config).vocab_size
    for prefix in indexed:
        dataset = IndexedDataset(prefix)
        try:
            dataset.check_token_ids(vocab_size, config.data.data_cache_path)
        finally:
            dataset.close()


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0
