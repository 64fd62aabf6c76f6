"""Supervised fine-tuning sequences: samples packed into fixed-length sequences (or padded).

The input is what `tools/preprocess_sft.py` writes: two indexed datasets with one document per
sample, `PREFIX_tokens_document` (token ids) and `PREFIX_loss_mask_document` (1 where a token is a
target: assistant content and its end of turn). A sample of n tokens gives n - 1 predictions:
inputs are its tokens but the last, labels its tokens but the first, and the loss mask is the
mask of the labels. Packing places whole samples one after another into sequences of
`seq_length` positions, in a seeded order per epoch, starting a new sequence when the next sample
does not fit (so no sample is split); each sample's positions start again at 0 and its segment
id tells the model which tokens it may attend to (`segment_ids`: the sample's number within the
sequence). The rest of a sequence is padding: its own segment, loss mask 0. Without packing
every sample is a sequence of its own.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset, dataset_exists

# The files of SFT data written with `--output-prefix PREFIX` (tools/preprocess_sft.py):
# PREFIX_tokens_document, PREFIX_loss_mask_document, and the validation split's under PREFIX-valid.
TOKENS_SUFFIX = "_tokens_document"
LOSS_MASK_SUFFIX = "_loss_mask_document"
VALID_SUFFIX = "-valid"


def sft_dataset_prefixes(prefix: str) -> tuple[str, str]:
    """The indexed-dataset prefixes (tokens, loss mask) of SFT data written with `--output-prefix
    prefix` (or `prefix + VALID_SUFFIX` for the validation split)."""
    return prefix + TOKENS_SUFFIX, prefix + LOSS_MASK_SUFFIX


def open_sft_files(prefix: str) -> tuple[IndexedDataset, IndexedDataset]:
    """The tokens and loss-mask datasets of `prefix`, checked to describe the same samples."""
    for suffix in (TOKENS_SUFFIX, LOSS_MASK_SUFFIX):
        if not dataset_exists(prefix + suffix):
            raise ValueError(f"{prefix + suffix}.bin/.idx not found; write SFT data with tools/preprocess_sft.py "
                             f"--output-prefix {prefix}")
    tokens, mask = (IndexedDataset(p) for p in sft_dataset_prefixes(prefix))
    if not np.array_equal(tokens.document_lengths, mask.document_lengths):
        raise ValueError(f"{prefix}: the token and loss-mask files describe different samples; write them again "
                         f"with tools/preprocess_sft.py")
    return tokens, mask


def pack(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Sample ids in `order`, grouped into sequences of at most `capacity` positions (each
    sample takes `lengths[id]`), a new sequence whenever the next sample does not fit."""
    bins, current, used = [], [], 0
    for sample in order:
        size = int(lengths[sample])
        if current and used + size > capacity:
            bins.append(np.asarray(current, dtype=np.int64))
            current, used = [], 0
        current.append(int(sample))
        used += size
    if current:
        bins.append(np.asarray(current, dtype=np.int64))
    return bins


class SFTDataset(torch.utils.data.Dataset):
    """`num_samples` sequences of `seq_length` positions from the SFT files at `prefix`, as many
    epochs as that takes (a fresh seeded order per epoch); dict items as GPT pretraining's, plus
    `segment_ids`."""

    def __init__(self, prefix: str, *, seq_length: int, num_samples: int, seed: int, packing: bool = True,
                 pad_id: int = 0, split_name: str = "train"):
        self.tokens, self.mask = open_sft_files(prefix)
        self.seq_length, self.pad_id, self.split_name = seq_length, pad_id, split_name
        predictions = self.tokens.document_lengths.astype(np.int64) - 1
        if len(predictions) == 0 or predictions.max() < 1:
            raise ValueError(f"{prefix} holds no sample of two tokens or more; nothing to fine-tune on")
        if predictions.max() > seq_length:
            longest = int(np.argmax(predictions))
            raise ValueError(f"{prefix}: sample {longest} has {predictions[longest] + 1} tokens, more than "
                             f"--seq-length {seq_length} + 1; preprocess with --seq-length {seq_length}")
        self.lengths = np.maximum(predictions, 0)
        usable = np.flatnonzero(self.lengths > 0)
        self.sequences: list[np.ndarray] = []
        self.epoch_sizes: list[int] = []
        epoch = 0
        while len(self.sequences) < num_samples or not self.sequences:
            order = np.random.RandomState(seed + epoch).permutation(usable)
            epoch_bins = pack(self.lengths, order, seq_length) if packing else [np.asarray([s]) for s in order]
            self.sequences += epoch_bins
            self.epoch_sizes.append(len(epoch_bins))
            epoch += 1
        self.num_samples = num_samples

    @property
    def sequences_per_epoch(self) -> int:
        return self.epoch_sizes[0]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        L = self.seq_length
        tokens = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(L, dtype=np.float32)
        position_ids = np.zeros(L, dtype=np.int64)
        segment_ids = np.zeros(L, dtype=np.int64)
        start = 0
        samples = self.sequences[index]
        for number, sample in enumerate(samples):
            ids = self.tokens.get_document(int(sample)).astype(np.int64)
            mask = self.mask.get_document(int(sample))
            n = len(ids) - 1
            tokens[start:start + n] = ids[:-1]
            labels[start:start + n] = ids[1:]
            loss_mask[start:start + n] = mask[1:]
            position_ids[start:start + n] = np.arange(n)
            segment_ids[start:start + n] = number
            start += n
        position_ids[start:] = np.arange(L - start)
        segment_ids[start:] = len(samples)  # padding: a segment of its own, never a target
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids),
                "segment_ids": torch.from_numpy(segment_ids)}
