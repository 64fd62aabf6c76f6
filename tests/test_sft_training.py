"""Supervised fine-tuning: packed sequences are laid out exactly, a packed sequence gives each
sample the loss it has alone, the loss counts exactly the response tokens, and finetune_sft.py
trains the same at every layout, resumes exactly, and starts from a pretrained checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import finetune_sft
from distributed import run_distributed
from megatron.core.datasets.indexed_dataset import IndexedDatasetWriter
from megatron.core.datasets.sft_dataset import SFTDataset, pack, sft_dataset_prefixes
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.transformer.config import TransformerConfig
from megatron.training.cli import run_cli

VOCAB = 60


def synthetic_samples(count: int, seed: int, max_len: int = 14) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) per sample: a "prompt" of ids 1..29 with mask 0, then a "response" whose
    ids follow from the prompt (each response token is (prompt sum + k) mod 30 + 30), mask 1."""
    rng = np.random.RandomState(seed)
    samples = []
    for _ in range(count):
        prompt = rng.randint(1, 30, size=rng.randint(2, max_len // 2))
        response = (prompt.sum() + np.arange(rng.randint(2, max_len // 2))) % 30 + 30
        tokens = np.concatenate([prompt, response])
        mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(response))]).astype(np.uint8)
        samples.append((tokens, mask))
    return samples


def write_sft(prefix, samples) -> str:
    tokens_prefix, mask_prefix = sft_dataset_prefixes(str(prefix))
    with IndexedDatasetWriter(tokens_prefix, np.uint16) as tokens, IndexedDatasetWriter(mask_prefix, np.uint8) as masks:
        for ids, mask in samples:
            tokens.add_document(ids)
            masks.add_document(mask)
        tokens.finalize()
        masks.finalize()
    return str(prefix)


def test_packing_places_every_sample_whole_once_per_epoch(tmp_path):
    samples = synthetic_samples(23, seed=1)
    prefix = write_sft(tmp_path / "sft", samples)
    data = SFTDataset(prefix, seq_length=20, num_samples=40, seed=5, pad_id=0)
    epoch = data.epoch_sizes[0]
    seen = []
    for index in range(epoch):
        item = data[index]
        segments = item["segment_ids"].numpy()
        members = data.sequences[index]
        start = 0
        for number, sample in enumerate(members):
            ids, mask = samples[sample]
            n = len(ids) - 1
            window = slice(start, start + n)
            assert np.array_equal(item["tokens"][window].numpy(), ids[:-1])
            assert np.array_equal(item["labels"][window].numpy(), ids[1:])
            assert np.array_equal(item["loss_mask"][window].numpy(), mask[1:])
            assert np.array_equal(item["position_ids"][window].numpy(), np.arange(n))
            assert (segments[window] == number).all()
            start += n
        assert start <= 20 and (item["loss_mask"][start:] == 0).all() and (segments[start:] == len(members)).all()
        seen += list(members)
    assert sorted(seen) == list(range(23))  # every sample exactly once in the first epoch
    assert len(data) == 40 and len(data.epoch_sizes) >= 2
    assert list(data.sequences[epoch]) != list(data.sequences[0]) or epoch == 1  # a new order per epoch
    unpacked = SFTDataset(prefix, seq_length=20, num_samples=23, seed=5, packing=False)
    assert unpacked.sequences_per_epoch == 23 and epoch < 23
    with pytest.raises(ValueError, match="preprocess with --seq-length 8"):
        SFTDataset(prefix, seq_length=8, num_samples=1, seed=0)


def test_pack_keeps_order_and_capacity():
    lengths = np.array([5, 3, 4, 8, 1, 2])
    assert [list(b) for b in pack(lengths, np.arange(6), 8)] == [[0, 1], [2], [3], [4, 5]]


def build(variant: str) -> GPTModel:
    extra = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=2,
                 untie_embeddings_and_output_weights=True) if variant == "llama" else {}
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=64,
                               max_position_embeddings=32, ffn_hidden_size=96, hidden_dropout=0.0,
                               attention_dropout=0.0, **extra)
    model = GPTModel(config, device="meta")
    ps = ParallelState.single("cpu")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=3)
    return model.eval()


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_a_packed_sequence_gives_each_sample_its_own_losses(variant, tmp_path):
    """Positions restart and attention stays inside each sample: per-token losses of a packed
    sequence equal those of each sample run alone (FP32, 1e-6), learned and rotary positions."""
    samples = synthetic_samples(9, seed=2)
    data = SFTDataset(write_sft(tmp_path / "sft", samples), seq_length=30, num_samples=1, seed=0)
    model = build(variant)
    for index in range(data.sequences_per_epoch):
        item = data[index]
        with torch.no_grad():
            packed = model(item["tokens"][None], item["labels"][None], position_ids=item["position_ids"][None],
                           segment_ids=item["segment_ids"][None])[0]
        start = 0
        for sample in data.sequences[index]:
            ids = torch.from_numpy(samples[sample][0].astype(np.int64))
            with torch.no_grad():
                alone = model(ids[None, :-1], ids[None, 1:])[0]
            torch.testing.assert_close(packed[start:start + len(alone)], alone, rtol=1e-6, atol=1e-6)
            start += len(alone)


def test_the_loss_counts_exactly_the_response_tokens(tmp_path):
    """Changing a prompt-side label changes neither the loss nor any gradient; the loss is the
    mean of the per-token losses over the response tokens, each counted once."""
    from megatron.training.sft import sft_forward_step

    samples = synthetic_samples(6, seed=4)
    data = SFTDataset(write_sft(tmp_path / "sft", samples), seq_length=30, num_samples=2, seed=0)
    batch = {k: torch.stack([data[0][k], data[1][k]]) for k in data[0]}
    model = build("llama").train()

    def loss_and_grads(b):
        model.zero_grad()
        output, loss_fn = sft_forward_step(iter([b]), model, torch.device("cpu"))
        loss, _ = loss_fn(output)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], output.detach()

    loss, grads, per_token = loss_and_grads(batch)
    mask = batch["loss_mask"]
    assert loss.item() == pytest.approx((per_token * mask).sum().item() / mask.sum().item(), rel=1e-6)
    changed = dict(batch, labels=torch.where(mask == 0, (batch["labels"] + 7) % VOCAB, batch["labels"]))
    assert not torch.equal(changed["labels"], batch["labels"])
    loss2, grads2, _ = loss_and_grads(changed)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


# ----- finetune_sft.py end to end -------------------------------------------------------------
TRAIN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
         "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "1", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "16", "--device", "cpu",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1", "--eval-interval", "3",
         "--eval-iters", "1", "--num-workers", "0", "--normalization", "RMSNorm", "--swiglu",
         "--position-embedding-type", "rope"]


def write_train_and_valid(root, num_train: int, num_valid: int, seed: int):
    """`root`/train and its validation files `root`/train-valid (which finetune_sft.py finds)."""
    write_sft(root / "train", synthetic_samples(num_train, seed=seed))
    write_sft(root / "train-valid", synthetic_samples(num_valid, seed=seed + 1))
    return root


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_train_and_valid(tmp_path_factory.mktemp("sft-data"), 64, 8, seed=7)


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def run_sft(argv) -> int:
    return run_cli(lambda: finetune_sft.main(argv))


def sft_worker(rank, world_size, argv):
    return run_sft(argv)


def test_sft_trains_alike_at_every_layout_and_resumes_exactly(sft_data, tmp_path):
    base = TRAIN + ["--data-path", str(sft_data / "train"), "--train-iters", "6"]
    assert run_sft(base + ["--metrics-file", str(tmp_path / "tp1.jsonl")]) == 0
    tp1 = metrics(tmp_path / "tp1.jsonl")
    assert [r["iteration"] for r in tp1 if "loss" in r] == list(range(1, 7))
    losses = [r["loss"] for r in tp1 if "loss" in r]
    assert losses[-1] < losses[0] - 0.1  # it learns the response rule
    # Each record counts the response tokens of its global batch (the loss mask of 8 sequences).
    data = SFTDataset(str(sft_data / "train"), seq_length=32, num_samples=48, seed=1234, pad_id=VOCAB)
    for record in tp1:
        batch = range((record["iteration"] - 1) * 8, record["iteration"] * 8)
        assert record["response_tokens"] == sum(int(data[i]["loss_mask"].sum()) for i in batch)
    for name, layout in (("tp2", ["--tensor-model-parallel-size", "2"]), ("pp2", ["--pipeline-model-parallel-size", "2"])):
        out = tmp_path / f"{name}.jsonl"
        assert run_distributed(sft_worker, 2, base + layout + ["--metrics-file", str(out)],
                               init_process_group=False, timeout=300) == [0, 0]
        got = [r["loss"] for r in metrics(out) if "loss" in r]
        assert got == pytest.approx(losses, rel=1e-5), name
        assert [r["response_tokens"] for r in metrics(out)] == [r["response_tokens"] for r in tp1]
    # Stop after 3, resume: the same losses to the bit.
    ckpt, split = tmp_path / "ckpt", tmp_path / "split.jsonl"
    assert run_sft(base + ["--save", str(ckpt), "--exit-interval", "3", "--metrics-file", str(split)]) == 0
    assert run_sft(base + ["--save", str(ckpt), "--load", str(ckpt), "--metrics-file", str(split)]) == 0
    assert [r["loss"] for r in metrics(split) if "loss" in r] == losses


def test_sft_starts_from_pretrained_weights_and_counts_epochs(sft_data, tmp_path):
    """--pretrained-checkpoint: iteration 1's loss is the loss of the first global batch under
    the saved weights (computed here from load_gpt_for_inference); --num-epochs sets the
    iterations from the packed sequences."""
    from megatron.training.inference_model import load_gpt_for_inference
    from megatron.training.sft import sft_forward_step

    first = tmp_path / "first"
    assert run_sft(TRAIN + ["--data-path", str(sft_data / "train"), "--train-iters", "3", "--save", str(first)]) == 0
    out = tmp_path / "second.jsonl"
    assert run_sft(TRAIN + ["--data-path", str(sft_data / "train"), "--num-epochs", "2", "--pretrained-checkpoint",
                            str(first), "--metrics-file", str(out)]) == 0
    records = [r for r in metrics(out) if "loss" in r]
    data = SFTDataset(str(sft_data / "train"), seq_length=32, num_samples=8, seed=1234, pad_id=VOCAB)
    assert len(records) == (2 * data.sequences_per_epoch) // 8
    model = load_gpt_for_inference(str(first), ParallelState.single("cpu")).model
    token_sum, tokens = 0.0, 0
    for start in range(0, 8, 2):
        batch = {k: torch.stack([data[start][k], data[start + 1][k]]) for k in data[0]}
        with torch.no_grad():
            output, loss_fn = sft_forward_step(iter([batch]), model, torch.device("cpu"))
            count = int(batch["loss_mask"].sum())
            token_sum, tokens = token_sum + loss_fn(output)[0].item() * count, tokens + count
    # The per-token loss (SFT's default): every response token of the global batch weighs the same.
    assert records[0]["loss"] == pytest.approx(token_sum / tokens, rel=1e-5)
    bad = run_sft(TRAIN + ["--data-path", str(sft_data / "train"), "--train-iters", "1",
                           "--pretrained-checkpoint", str(tmp_path / "missing")])
    assert bad == 2


def test_o3_fine_tunes_as_none_does(sft_data, tmp_path):
    """The same SFT run at none and at O3 (FP8 GEMMs, FP8 gradients and Adam states, FP8 weights):
    the mean response loss of the last iterations within 1%, both well below where they started.
    (bench/sft.py measures the demo's run; docs/benchmarks.md.)"""
    finals = {}
    for level in ("none", "O3"):
        out = tmp_path / f"{level}.jsonl"
        assert run_sft(TRAIN + ["--data-path", str(sft_data / "train"), "--train-iters", "30", "--fp8-level", level,
                                "--fp8-min-features", "32", "--fp8-recipe", "current",
                                "--metrics-file", str(out)]) == 0
        losses = [r["loss"] for r in metrics(out) if "loss" in r]
        finals[level] = sum(losses[-5:]) / 5
        assert finals[level] < losses[0] - 0.5
    assert finals["O3"] == pytest.approx(finals["none"], rel=0.01), finals
