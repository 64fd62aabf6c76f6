"""Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh (the version with
--rampup-batch-size), its flag set unchanged but the sizes scaled down to a tiny model, trained
by pretrain_gpt.py on data tokenized with a GPT-2 BPE vocabulary written here: it runs, exits 0,
and writes the metrics file of DESIGN.md and TensorBoard under Megatron-LM's tag names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_gpt
from megatron.core.tokenizers.gpt2_bpe import GPT2BPETokenizer
from megatron.training.cli import run_cli
from megatron.training.metrics import missing_contract_keys

REPO = Path(__file__).resolve().parent.parent


def upstream_flags(vocab_file, merge_file, data_path, checkpoints, tensorboard) -> list[str]:
    """The script's arrays, in its order, with its values scaled down (comment: the original)."""
    gpt_model_args = [
        "--num-layers", "2",                     # 96
        "--hidden-size", "64",                   # 12288
        "--num-attention-heads", "4",            # 96
        "--seq-length", "32",                    # 2048
        "--max-position-embeddings", "32",       # 2048
        "--attention-backend", "auto",
    ]
    training_args = [
        "--micro-batch-size", "1",
        "--global-batch-size", "8",              # 1536
        "--rampup-batch-size", "2", "2", "12",   # 16 16 5859375
        "--train-iters", "8",                    # 500000
        "--weight-decay", "0.1",
        "--adam-beta1", "0.9",
        "--adam-beta2", "0.95",
        "--init-method-std", "0.006",
        "--clip-grad", "1.0",
        "--fp16",
        "--lr", "6.0e-5",
        "--lr-decay-style", "cosine",
        "--min-lr", "6.0e-6",
        "--lr-warmup-fraction", ".125",          # .001
        "--lr-decay-iters", "7",                 # 430000
    ]
    model_parallel_args = [
        "--tensor-model-parallel-size", "1",     # 8
        "--pipeline-model-parallel-size", "1",   # 16
    ]
    data_args = [
        "--data-path", str(data_path),
        "--vocab-file", str(vocab_file),
        "--merge-file", str(merge_file),
        "--split", "949,50,1",
    ]
    eval_and_logging_args = [
        "--log-interval", "1",                   # 100
        "--save-interval", "4",                  # 10000
        "--eval-interval", "4",                  # 1000
        "--save", str(checkpoints),
        "--load", str(checkpoints),
        "--eval-iters", "2",                     # 10
        "--tensorboard-dir", str(tensorboard),
    ]
    return gpt_model_args + training_args + model_parallel_args + data_args + eval_and_logging_args


@pytest.fixture(scope="module")
def gpt2_data(builtin_corpus_small, tmp_path_factory, run_tool):
    """A 512-token GPT-2 vocabulary (vocab.json, merges.txt) trained on part of the built-in corpus,
    and that part tokenized with it by tools/preprocess_data.py: 1000 paragraphs as documents, so
    that --split 949,50,1 leaves one for the test split."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("gpt2-bpe")
    paragraphs = (p for text in builtin_corpus_small.documents() for p in text.split("\n\n") if p.strip())
    documents = [next(paragraphs) for _ in range(1000)]
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(documents, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.model.save(str(folder))
    vocab_file, merge_file = folder / "vocab.json", folder / "merges.txt"
    result = run_tool("preprocess_data.py", "--input", corpus, "--output-prefix", folder / "gpt2",
                      "--vocab-file", vocab_file, "--merge-file", merge_file, "--append-eod", "--workers", "2")
    assert result.returncode == 0, result.stderr
    return vocab_file, merge_file, folder / "gpt2_text_document"


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_upstream_gpt3_flag_set_trains_and_logs(gpt2_data, tmp_path, monkeypatch, capsys):
    vocab_file, merge_file, data_path = gpt2_data
    metrics = tmp_path / "metrics.jsonl"
    argv = upstream_flags(vocab_file, merge_file, data_path, tmp_path / "checkpoints", tmp_path / "tb") + [
        "--device", "cpu", "--num-workers", "0", "--metrics-file", str(metrics)]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli(lambda: pretrain_gpt.main(argv)) == 0
    out = capsys.readouterr().out
    assert "ETA:" in out and "loss scale:" in out and "validation loss at iteration 4" in out

    records = read_metrics(metrics)
    assert [r["iteration"] for r in records] == list(range(1, 9))
    assert all(missing_contract_keys(r) == [] for r in records)  # DESIGN.md's contract
    # 2 -> 8 in steps of 2 over 12 samples (4 a step): 2, 2, 4, 6 (at 10 samples), then 8 from 16 on
    assert [r["global_batch_size"] for r in records] == [2, 2, 4, 6, 8, 8, 8, 8]
    assert [r["consumed_samples"] for r in records] == [2, 4, 8, 14, 22, 30, 38, 46]
    # --fp16 starts at 2^32 like upstream; overflowing steps are skipped and, after the
    # hysteresis (2), halve the scale
    scales = [r["loss_scale"] for r in records]
    assert scales[0] == 2.0 ** 32 and scales == sorted(scales, reverse=True)
    assert all(r["skipped"] == 1 for r in records if r["loss_scale"] < 2.0 ** 32)
    assert GPT2BPETokenizer(vocab_file, merge_file).vocab_size == 512
    assert (tmp_path / "checkpoints").is_dir() and any((tmp_path / "checkpoints").iterdir())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "batch-size", "grad-norm", "loss-scale", "iteration-time",
            "lm loss validation", "lm loss vs samples", "batch-size vs samples",
            "lm loss validation vs samples"} <= tags
    assert [e.value for e in events.Scalars("batch-size")] == [2, 2, 4, 6, 8, 8, 8, 8]
    assert [e.step for e in events.Scalars("lm loss validation")] == [4, 8]


@pytest.mark.slow
def test_upstream_fp8_recipe_turns_fp8_on(gpt2_data, tmp_path, monkeypatch, capsys):
    """Megatron-LM's FP8 flags without --fp8-level: FP8 GEMMs (level O0), not silently BF16."""
    vocab_file, merge_file, data_path = gpt2_data
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
            "--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
            "--fp8-min-features", "32", "--data-path", str(data_path), "--vocab-file", str(vocab_file),
            "--merge-file", str(merge_file), "--device", "cpu", "--eval-iters", "0", "--log-interval", "1"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli(lambda: pretrain_gpt.main(argv)) == 0
    assert "fp8 level O0" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.distributed
def test_upstream_flags_with_a_pipeline_under_torchrun(gpt2_data, tmp_path):
    """The same flag set over two pipeline stages: the ramped micro-batch counts go through the
    1F1B schedule, the loss scale through the stages."""
    vocab_file, merge_file, data_path = gpt2_data
    flags = upstream_flags(vocab_file, merge_file, data_path, tmp_path / "checkpoints", tmp_path / "tb")
    flags[flags.index("--pipeline-model-parallel-size") + 1] = "2"
    flags[flags.index("--train-iters") + 1] = "5"
    metrics = tmp_path / "metrics.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "pretrain_gpt.py", *flags, "--device", "cpu", "--num-workers", "0", "--metrics-file", str(metrics)]
    env = {key: value for key, value in os.environ.items() if key != "WORLD_SIZE"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(metrics)
    assert [r["global_batch_size"] for r in records] == [2, 2, 4, 6, 8]
    assert all(missing_contract_keys(r) == [] for r in records) and records[-1]["comm"]["pp_bytes"] > 0
