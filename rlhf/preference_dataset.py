"""Preference pairs as training samples for the one training loop (reward models and DPO).

`PreferenceDataset` turns the pairs of `rlhf.data.read_preference_pairs` into `num_samples` items
(as many seeded epochs as that takes, a fresh order per epoch), each a dict of tensors whose first
dimension is the side (0 = chosen, 1 = rejected):

  tokens     [2, s]  the conversation's ids, padded with `pad_id`
  labels     [2, s]  the next token at each position (padding after the end)
  loss_mask  [2, s]  1 where the label is one of the final answer's tokens (DPO sums log p there)
  last_index [2]     the position of each side's last real token (a reward model reads it there)

A DataLoader stacks them to [b, 2, s]; `both_sides` flattens that to [2b, s] with the chosen
sides first, so one forward pass takes both.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf.data import PreferencePair


class PreferenceDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[PreferencePair], *, seq_length: int, num_samples: int, seed: int,
                 pad_id: int = 0, shuffle: bool = True):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        longest = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
        if longest > seq_length:
            raise ValueError(f"a preference pair has a side of {longest} tokens, more than --seq-length {seq_length}; "
                             f"raise --seq-length or read the pairs with max_tokens={seq_length}")
        self.pairs, self.seq_length, self.pad_id = pairs, seq_length, pad_id
        self.num_samples = num_samples
        order, epoch = [], 0
        while len(order) < max(num_samples, 1):
            order += list(np.random.RandomState(seed + epoch).permutation(len(pairs)) if shuffle
                          else np.arange(len(pairs)))
            epoch += 1
        self.order = np.asarray(order[:max(num_samples, 1)], dtype=np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def _side(self, ids: np.ndarray, mask: np.ndarray):
        L, n = self.seq_length, len(ids)
        tokens = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(L, dtype=np.float32)
        tokens[:n] = ids
        labels[:n - 1] = ids[1:]
        loss_mask[:n - 1] = mask[1:]
        return tokens, labels, loss_mask, n - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[int(self.order[index])]
        sides = [self._side(np.asarray(pair.chosen, dtype=np.int64), np.asarray(pair.chosen_mask)),
                 self._side(np.asarray(pair.rejected, dtype=np.int64), np.asarray(pair.rejected_mask))]
        return {"tokens": torch.from_numpy(np.stack([s[0] for s in sides])),
                "labels": torch.from_numpy(np.stack([s[1] for s in sides])),
                "loss_mask": torch.from_numpy(np.stack([s[2] for s in sides])),
                "last_index": torch.tensor([s[3] for s in sides], dtype=torch.long)}


def both_sides(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[b, 2, ...] -> [2b, ...], the b chosen sides first, then the b rejected ones."""
    return {key: value.transpose(0, 1).reshape(-1, *value.shape[2:]) for key, value in batch.items()}
