"""GPTDataset samples and indices, splits, blending, and the resumable data-parallel sampler."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from megatron.core.datasets import gpt_dataset as gpt_dataset_module
from megatron.core.datasets.blended_dataset import BlendedDataset, blending_indices
from megatron.core.datasets.builder import build_gpt_datasets, train_valid_test_num_samples
from megatron.core.datasets.config import (
    GPTDatasetConfig, parse_data_path, parse_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, build_sample_indices, split_ranges
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from megatron.core.datasets.samplers import PretrainingSampler, build_pretraining_data_loader, cyclic_iterator
from megatron.training.config import DataArgs


def _write_numbered_dataset(prefix, lengths, first_token=0):
    """Document d holds consecutive ids, so every token says which document and position it came from."""
    documents, next_token = [], first_token
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for length in lengths:
            documents.append(np.arange(next_token, next_token + length))
            writer.add_document(documents[-1])
            next_token += length
        writer.finalize()
    return IndexedDataset(prefix), documents


LENGTHS = [7, 0, 13, 1, 25, 3, 0, 9, 16, 2, 11, 4]


@pytest.fixture
def numbered(tmp_path):
    return _write_numbered_dataset(tmp_path / "numbered", LENGTHS)


def _dataset(indexed, tmp_path, num_samples=40, seq_length=8, seed=1234, document_range=None, **kwargs):
    return GPTDataset(indexed, document_range=document_range or (0, len(indexed)), num_samples=num_samples,
                      seq_length=seq_length, seed=seed, cache_dir=tmp_path / "cache", **kwargs)


def test_samples_are_consecutive_windows_of_the_shuffled_document_stream(numbered, tmp_path):
    indexed, documents = numbered
    dataset = _dataset(indexed, tmp_path, num_samples=40, seq_length=8)
    total = sum(LENGTHS)
    num_epochs = -(-(40 * 8 + 1) // total)
    assert len(dataset.document_index) == num_epochs * len(LENGTHS)
    for epoch in range(num_epochs):  # every epoch visits every document once, in its own order
        epoch_order = dataset.document_index[epoch * len(LENGTHS):(epoch + 1) * len(LENGTHS)]
        assert sorted(epoch_order) == list(range(len(LENGTHS)))
    assert not np.array_equal(dataset.document_index[:len(LENGTHS)], dataset.document_index[len(LENGTHS):2 * len(LENGTHS)])
    stream = np.concatenate([documents[d] for d in dataset.document_index])
    served_order = np.argsort(dataset.shuffle_index)  # undo the shuffle: sample j is served at served_order[j]
    crossing = 0
    for j in range(40):
        tokens = dataset.sample_tokens(int(served_order[j]))
        np.testing.assert_array_equal(tokens, stream[j * 8: j * 8 + 9])  # labels overlap the next sample by one
        crossing += len(set(np.searchsorted(np.cumsum(LENGTHS), tokens, side="right"))) > 1
    assert crossing > 10  # samples do run across document boundaries
    item = dataset[5]
    expected = dataset.sample_tokens(5)
    assert torch.equal(item["tokens"], torch.from_numpy(expected[:-1]))
    assert torch.equal(item["labels"], torch.from_numpy(expected[1:]))
    assert torch.equal(item["position_ids"], torch.arange(8)) and item["loss_mask"].sum() == 8


def test_last_partial_epoch_is_shuffled_after_the_full_epochs():
    lengths = np.full(10, 10)  # 100 tokens an epoch: 2.5 epochs for 25 samples of 10 tokens
    _, _, shuffle_index = build_sample_indices(lengths, np.arange(10), 25, 10, seed=3)
    full_epoch_samples = (2 * 100 - 1) // 10
    assert sorted(shuffle_index[:full_epoch_samples]) == list(range(full_epoch_samples))
    assert sorted(shuffle_index) == list(range(25))


def test_indices_are_deterministic_per_seed_and_differ_across_seeds(numbered, tmp_path):
    indexed, _ = numbered
    first = build_sample_indices(indexed.sequence_lengths, np.arange(len(indexed)), 60, 8, seed=7)
    again = build_sample_indices(indexed.sequence_lengths, np.arange(len(indexed)), 60, 8, seed=7)
    other = build_sample_indices(indexed.sequence_lengths, np.arange(len(indexed)), 60, 8, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2]) and not np.array_equal(first[0], other[0])
    samples = [_dataset(indexed, tmp_path / f"run{i}", seed=7).sample_tokens(3) for i in range(2)]
    np.testing.assert_array_equal(*samples)


def test_indices_are_cached_and_rebuilt_when_the_data_changes(tmp_path, monkeypatch):
    indexed, _ = _write_numbered_dataset(tmp_path / "data", LENGTHS)
    built = _dataset(indexed, tmp_path)
    cache_files = sorted(os.listdir(tmp_path / "cache"))
    assert len(cache_files) == 4 and all("GPTDataset-train" in name for name in cache_files)

    def must_not_build(*args, **kwargs):
        raise AssertionError("indices were rebuilt although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(gpt_dataset_module, "build_sample_indices", must_not_build)
        cached = _dataset(indexed, tmp_path)
    np.testing.assert_array_equal(cached.shuffle_index, built.shuffle_index)
    assert cached.sample_tokens(0).tolist() == built.sample_tokens(0).tolist()
    # New data under the same name (one document longer): the cached indices are stale.
    changed, documents = _write_numbered_dataset(tmp_path / "data", LENGTHS[:-1] + [LENGTHS[-1] + 5])
    rebuilt = _dataset(changed, tmp_path)
    assert not np.array_equal(rebuilt.sample_index, built.sample_index)
    stream = np.concatenate([documents[d] for d in rebuilt.document_index])
    served_order = np.argsort(rebuilt.shuffle_index)
    for j in range(40):
        np.testing.assert_array_equal(rebuilt.sample_tokens(int(served_order[j])), stream[j * 8: j * 8 + 9])
    assert sorted(os.listdir(tmp_path / "cache")) == cache_files  # replaced in place, nothing left over


def test_eod_mask_loss(tmp_path):
    with IndexedDatasetWriter(tmp_path / "eod", np.uint16) as writer:
        for document in ([5, 6, 99], [7, 99], [8, 9, 10, 99]):
            writer.add_document(document)
        writer.finalize()
    dataset = _dataset(IndexedDataset(tmp_path / "eod"), tmp_path, num_samples=3, seq_length=4, eod_id=99,
                       eod_mask_loss=True)
    for i in range(3):
        item = dataset[i]
        assert torch.equal(item["loss_mask"], (item["tokens"] != 99).float())
    with pytest.raises(ValueError, match="needs the tokenizer's EOD id"):
        _dataset(IndexedDataset(tmp_path / "eod"), tmp_path, eod_mask_loss=True)


# ------------------------------------------------------------------------------------ config and splits

def test_split_and_data_path_parsing():
    assert split_ranges(1000, parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, parse_split("98/2")) == [(0, 10), (10, 10), (10, 10)]
    assert parse_split("1") == (1.0, 0.0, 0.0)
    assert parse_data_path(["a", "b"]) == [("a", None), ("b", None)]
    assert parse_data_path(["3", "a", "1", "b"]) == [("a", 0.75), ("b", 0.25)]
    for bad_split in ("", "1,x", "1,2,3,4", "0,0", "-1,2"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad_split)
    for bad_path, message in ((["0.5", "a", "b"], "mixes weights"), (["0", "a"], "must be positive"), ([], "empty")):
        with pytest.raises(ValueError, match=message):
            parse_data_path(bad_path)


def test_config_from_command_line_and_its_checks():
    parser = argparse.ArgumentParser()
    DataArgs.add_to(parser)
    args = parser.parse_args(["--data-path", "0.7", "A", "0.3", "B", "--seq-length", "64", "--split", "90,10,0"])
    config = DataArgs.from_namespace(args).dataset_config(seed=1234)
    assert config.blend == [("A", 0.7), ("B", 0.3)] and config.split_weights == (0.9, 0.1, 0.0)
    assert (config.seq_length, config.seed, config.eod_mask_loss) == (64, 1234, False)
    with pytest.raises(ValueError, match="no training data; pass --data-path"):
        DataArgs.from_namespace(parser.parse_args(["--seq-length", "64"])).dataset_config(seed=1234)
    from_yaml = GPTDatasetConfig(data_path="0.5 A 0.5 B", seq_length=8, split=1)  # YAML gives strings and numbers
    assert from_yaml.blend == [("A", 0.5), ("B", 0.5)] and from_yaml.split_weights == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="--seq-length must be >= 1"):
        GPTDatasetConfig(data_path=["A"], seq_length=0)
    assert train_valid_test_num_samples(train_iters=100, global_batch_size=8, eval_interval=50, eval_iters=2) == (
        800, 48, 16)


def test_splits_use_disjoint_documents(tmp_path):
    _, documents = _write_numbered_dataset(tmp_path / "d", [10] * 100)
    config = GPTDatasetConfig(data_path=[str(tmp_path / "d")], seq_length=16, split="80,15,5")
    train, valid, test = build_gpt_datasets(config, [200, 50, 20])
    for dataset, (first, end) in zip((train, valid, test), [(0, 80), (80, 95), (95, 100)]):
        tokens = np.concatenate([dataset.sample_tokens(i) for i in range(len(dataset))])
        assert tokens.min() >= first * 10 and tokens.max() < end * 10
    assert build_gpt_datasets(GPTDatasetConfig(data_path=[str(tmp_path / "d")], seq_length=16, split="1"),
                              [10, 10, 10])[1:] == [None, None]
    with pytest.raises(IndexedDatasetError, match="not found; check --data-path"):
        build_gpt_datasets(GPTDatasetConfig(data_path=[str(tmp_path / "missing")], seq_length=16), [1, 1, 1])


# ------------------------------------------------------------------------------------ blending

def test_blending_holds_proportions_in_every_prefix():
    weights = [0.5, 0.3, 0.15, 0.05]
    dataset_index, sample_index = blending_indices(weights, 5000)
    counts = np.zeros(len(weights))
    worst = 0.0
    for n, d in enumerate(dataset_index, start=1):
        counts[d] += 1
        worst = max(worst, np.abs(counts - np.asarray(weights) * n).max())
    assert worst <= 1.0
    for d in range(len(weights)):  # each dataset's samples are taken in order, without gaps
        assert sample_index[dataset_index == d].tolist() == list(range(int(counts[d])))


def test_blended_data_path_draws_in_proportion(tmp_path):
    _write_numbered_dataset(tmp_path / "a", [50] * 40)
    _write_numbered_dataset(tmp_path / "b", [30] * 40, first_token=100_000)
    config = GPTDatasetConfig(data_path=["0.7", str(tmp_path / "a"), "0.3", str(tmp_path / "b")], seq_length=16,
                              split="1", data_cache_path=str(tmp_path / "cache"))
    train, _, _ = build_gpt_datasets(config, [1000, 0, 0])
    assert isinstance(train, BlendedDataset) and len(train) == 1000
    from_a = np.array([train[i]["tokens"][0].item() < 100_000 for i in range(len(train))])
    assert abs(from_a.mean() - 0.7) <= 0.002
    assert abs(from_a[:100].mean() - 0.7) <= 0.01  # also within a single early window
    # Prefixes without weights blend in proportion to their tokens (50 vs 30 per document).
    unweighted = GPTDatasetConfig(data_path=[str(tmp_path / "a"), str(tmp_path / "b")], seq_length=16, split="1",
                                  data_cache_path=str(tmp_path / "cache"))
    train, _, _ = build_gpt_datasets(unweighted, [800, 0, 0])
    from_a = np.array([train[i]["tokens"][0].item() < 100_000 for i in range(len(train))])
    assert abs(from_a.mean() - 50 / 80) <= 0.002


# ------------------------------------------------------------------------------------ sampler and resume

def _batches(**kwargs):
    return list(PretrainingSampler(**kwargs))


def test_data_parallel_ranks_split_each_global_batch_and_layouts_agree():
    common = dict(total_samples=100, consumed_samples=0, micro_batch_size=2, global_batch_size=16)
    single = _batches(**common)
    assert len(single) == 48 and single[0] == [0, 1]  # 6 whole global batches of 16; the last 4 samples dropped
    for size in (2, 4):
        per_rank = [_batches(**common, data_parallel_rank=r, data_parallel_size=size) for r in range(size)]
        assert PretrainingSampler(**common, data_parallel_size=size).num_micro_batches == 8 // size
        steps_per_batch = 8 // size
        for batch in range(6):
            window = slice(batch * steps_per_batch, (batch + 1) * steps_per_batch)
            taken = [i for rank in per_rank for micro in rank[window] for i in micro]
            assert sorted(taken) == list(range(batch * 16, (batch + 1) * 16))  # disjoint, complete, same batch


def test_resume_from_consumed_samples_continues_exactly(numbered, tmp_path):
    indexed, _ = numbered
    dataset = _dataset(indexed, tmp_path, num_samples=48, seq_length=8)
    loader_args = dict(micro_batch_size=2, global_batch_size=8, data_parallel_rank=1, data_parallel_size=2)
    uninterrupted = list(build_pretraining_data_loader(dataset, consumed_samples=0, **loader_args))
    consumed = 3 * 8  # stopped after three iterations
    resumed = list(build_pretraining_data_loader(dataset, consumed_samples=consumed, **loader_args))
    steps_done = consumed // (2 * 2)
    assert len(resumed) == len(uninterrupted) - steps_done > 0
    for expected, actual in zip(uninterrupted[steps_done:], resumed):
        assert torch.equal(expected["tokens"], actual["tokens"]) and torch.equal(expected["labels"], actual["labels"])
    assert resumed[0]["tokens"].shape == (2, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=10), "must be a multiple of --micro-batch-size"),
    (dict(consumed_samples=3), "consumed_samples 3 must be a non-negative multiple of 4"),
    (dict(data_parallel_rank=2), "outside 0..1"),
])
def test_sampler_refuses_inconsistent_batch_settings(kwargs, message):
    settings = dict(total_samples=64, consumed_samples=0, micro_batch_size=2, global_batch_size=8,
                    data_parallel_rank=0, data_parallel_size=2) | kwargs
    with pytest.raises(ValueError, match=message):
        PretrainingSampler(**settings)


def test_cyclic_iterator():
    iterator = cyclic_iterator([1, 2])
    assert [next(iterator) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="empty"):
        next(cyclic_iterator([]))


# ------------------------------------------------------------------------------------ on real text

def test_gpt_samples_of_the_builtin_corpus(builtin_corpus_small, tmp_path):
    from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer

    tokenizer = build_tokenizer(TokenizerConfig(tokenizer_type="SentencePieceTokenizer",
                                                tokenizer_model=str(builtin_corpus_small.tokenizer_model)))
    config = GPTDatasetConfig(data_path=[str(builtin_corpus_small.data_prefix)], seq_length=128, split="90,10,0",
                              data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(config, [5000, 200, 0], eod_id=tokenizer.eod)
    assert test is None and len(train) == 5000 and len(valid) == 200
    documents = builtin_corpus_small.documents()
    num_train_documents = split_ranges(len(documents), config.split_weights)[0][1]
    train_text = "".join(documents[:num_train_documents])
    sample = train.sample_tokens(0)
    pieces = [tokenizer.detokenize(part) for part in np.split(sample, np.flatnonzero(sample == tokenizer.eod))]
    assert all(piece.replace("\n", " ").strip() == "" or piece in train_text for piece in pieces)
