"""Data pipeline: indexed datasets (.bin/.idx), GPT samples, blending, resumable samplers.

Names are imported lazily so that the preprocessing workers, which need only the indexed dataset
writer, do not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetError": "indexed_dataset",
    "IndexedDatasetWriter": "indexed_dataset",
    "token_dtype_for_vocab": "indexed_dataset",
    "PreprocessConfig": "preprocessing",
    "preprocess": "preprocessing",
    "GPTDatasetConfig": "config",
    "parse_data_path": "config",
    "parse_split": "config",
    "GPTDataset": "gpt_dataset",
    "BlendedDataset": "blended_dataset",
    "build_gpt_datasets": "builder",
    "train_valid_test_num_samples": "builder",
    "blending_indices": "blended_dataset",
    "cyclic_iterator": "samplers",
    "PretrainingSampler": "samplers",
    "build_pretraining_data_loader": "samplers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
