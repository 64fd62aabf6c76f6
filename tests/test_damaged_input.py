"""Damaged input and damaged state: every input is checked before any work or write; a problem
ends in one line naming the file and the fix, exit code 2, and nothing on disk changes.

The classes of the issue's black-box campaign, each with several cases: work overwritten or
trained over, tracebacks instead of one line, messages that do not name the file or the fix, and
a rank's line lost under torchrun. Training runs are few and tiny (two iterations, one model
build each); most cases fail in the checks before the model is built.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron.core import checkpointing
from megatron.core.checkpoint_integrity import MANIFEST, read_manifest, write_manifest
from megatron.core.datasets.config import parse_data_path
from megatron.core.datasets.indexed_dataset import (
    TRAILER_BYTES, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, bin_path, idx_path,
)
from megatron.core.datasets.preprocessing import PreprocessConfig, preprocess
from megatron.core.parallel_state import ParallelState
from megatron.core.tokenizers.tokenizer import TokenizerConfig, build_tokenizer
from megatron.core.transformer.config import TransformerConfig
from megatron.training import preflight
from megatron.training.cli import run_cli
from megatron.training.config import parse_config
from megatron.training.inference_model import load_gpt_for_inference

REPO = Path(__file__).resolve().parent.parent
BASE = ["--config", str(REPO / "configs" / "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--log-interval", "1", "--eval-iters", "0", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-layers", "1", "--lr-warmup-iters", "0"]


def run(argv) -> int:
    return run_cli(lambda: pretrain_gpt.main([str(a) for a in argv]))


def one_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(builtin_corpus_small, tmp_path_factory):
    """A run of four iterations stopped after two, saved into the folder it loads from (a fresh
    start: the folder exists but is empty), and its arguments."""
    folder = tmp_path_factory.mktemp("trained")
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "4"]
    assert run(args + ["--load", ckpt, "--save", ckpt, "--exit-interval", "2"]) == 0
    assert checkpointing.latest_iteration(str(ckpt)) == 2
    return args, ckpt


def copy_of(ckpt: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(ckpt, target)
    return target


# ----- work overwritten or trained over ------------------------------------------------------------
def test_load_semantics_fresh_start_only_into_the_save_folder(tmp_path, capsys):
    absent, empty, a_file = tmp_path / "absent", tmp_path / "empty", tmp_path / "file"
    empty.mkdir()
    a_file.write_text("x")
    preflight.check_load(str(absent), str(absent))  # the first run of a job: fresh
    preflight.check_load(str(empty), str(empty))
    preflight.check_load(str(empty) + "/", str(empty))  # the same folder, spelled another way
    for load, save, fragment in [(absent, None, "does not exist"), (absent, tmp_path / "other", "does not exist"),
                                 (a_file, a_file, "is a file"), (empty, None, "holds no checkpoint"),
                                 (empty, tmp_path / "other", "holds no checkpoint")]:
        with pytest.raises(ValueError, match=fragment) as error:
            preflight.check_load(str(load), None if save is None else str(save))
        assert str(load) in str(error.value) and "\n" not in str(error.value)


def test_folders_without_the_tracker_are_refused_not_overwritten(trained, tmp_path, capsys):
    args, ckpt = trained
    ckpt = copy_of(ckpt, tmp_path)
    (ckpt / checkpointing.MARKER).unlink()
    before = snapshot(ckpt)
    assert run(args + ["--load", ckpt, "--save", ckpt]) == 2
    one_line(capsys, str(ckpt), "iter_0000002", "no latest_checkpointed_iteration.txt", "write 2 into")
    assert snapshot(ckpt) == before
    for load in (tmp_path / "typo", ckpt / checkpointing.MARKER.replace(".txt", ".bak")):
        assert run(args + ["--load", load, "--save", ckpt]) == 2
        one_line(capsys, str(load), "does not exist")
    (tmp_path / "a-file").write_text("not a folder")
    assert run(args + ["--load", tmp_path / "a-file"]) == 2
    one_line(capsys, "a-file is a file")
    assert snapshot(ckpt) == before


def test_nan_weights_are_refused_and_the_tracker_stays(trained, tmp_path, capsys):
    args, ckpt = trained
    ckpt = copy_of(ckpt, tmp_path)
    folder = checkpointing.iteration_dir(ckpt, 2)
    payload = torch.load(folder / "rank_00000.pt", weights_only=True)
    name = sorted(payload["model"])[0]
    payload["model"][name]["tensor"].view(-1)[3] = float("nan")
    torch.save(payload, folder / "rank_00000.pt")
    write_manifest(folder)  # consistent files: the values themselves are what is wrong
    before = snapshot(ckpt)
    assert run(args + ["--load", ckpt, "--save", ckpt]) == 2
    one_line(capsys, str(folder), name, "NaN or infinite", "another --load")
    assert snapshot(ckpt) == before and checkpointing.latest_iteration(str(ckpt)) == 2
    # Inference refuses it too.
    with pytest.raises(checkpointing.CheckpointError, match="NaN or infinite"):
        load_gpt_for_inference(str(ckpt), ParallelState.single("cpu"))
    # An infinite optimizer moment, with finite weights: refused where the moments are loaded.
    payload["model"][name]["tensor"].view(-1)[3] = 0.0
    moment_of = sorted(payload["optimizer"])[0]
    payload["optimizer"][moment_of]["exp_avg"].view(-1)[0] = float("inf")
    torch.save(payload, folder / "rank_00000.pt")
    write_manifest(folder)
    assert run(args + ["--load", ckpt, "--save", ckpt]) == 2
    one_line(capsys, f"the optimizer's exp_avg of {moment_of} holds NaN or infinite values")
    load_gpt_for_inference(str(ckpt), ParallelState.single("cpu"))  # inference reads weights only
    assert checkpointing.latest_iteration(str(ckpt)) == 2


def test_manifest_sizes_and_checksums(trained, tmp_path, capsys):
    args, ckpt = trained
    folder = checkpointing.iteration_dir(ckpt, 2)
    manifest = read_manifest(folder)
    assert set(manifest) == {"rank_00000.pt", "common.pt", "metadata.json"}
    assert manifest["rank_00000.pt"]["bytes"] == (folder / "rank_00000.pt").stat().st_size
    assert not list(folder.glob(".*"))  # the ranks' records were merged and removed
    ckpt = copy_of(ckpt, tmp_path)
    folder = checkpointing.iteration_dir(ckpt, 2)
    rank_file = folder / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    rank_file.write_bytes(bytes(data))
    assert run(args + ["--load", ckpt, "--save", ckpt]) == 2
    one_line(capsys, "rank_00000.pt cannot be loaded safely", "sha256", MANIFEST)
    # --no-verify-checkpoint-checksums: sizes only. A wrong recorded checksum then passes (the
    # file itself intact), a wrong size still does not.
    rank_file.write_bytes(bytes(data[:len(data) // 2]) + bytes([data[len(data) // 2] ^ 0xFF]) + bytes(data[len(data) // 2 + 1:]))
    records = json.loads((folder / MANIFEST).read_text())
    records["files"]["rank_00000.pt"]["sha256"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(records))
    assert run(args + ["--load", ckpt, "--save", tmp_path / "other", "--exit-interval", "3"]) == 2
    one_line(capsys, "rank_00000.pt", "sha256")
    assert run(args + ["--load", ckpt, "--save", tmp_path / "other", "--exit-interval", "3",
                       "--no-verify-checkpoint-checksums"]) == 0
    rank_file.write_bytes(bytes(data[:-100]))
    with pytest.raises(checkpointing.CheckpointError, match=r"has \d+ bytes, its manifest.json records"):
        checkpointing.check_file_sizes(folder, read_manifest(folder))
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(checkpointing.CheckpointError, match="manifest.json is unreadable"):
        checkpointing.read_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps({"files": {"common.pt": {"bytes": "ten"}}}))
    with pytest.raises(checkpointing.CheckpointError, match="does not list"):
        checkpointing.read_manifest(folder)


def test_a_checkpoint_without_manifest_still_resumes(trained, tmp_path, capsys):
    args, ckpt = trained
    ckpt = copy_of(ckpt, tmp_path)
    (checkpointing.iteration_dir(ckpt, 2) / MANIFEST).unlink()  # as saved before manifests existed
    assert run(args + ["--load", ckpt, "--save", ckpt]) == 0
    assert checkpointing.latest_iteration(str(ckpt)) == 4
    assert (checkpointing.iteration_dir(ckpt, 4) / MANIFEST).is_file()


def test_preprocessing_never_leaves_a_mismatched_pair(tmp_path, monkeypatch):
    prefix = tmp_path / "ds"
    _write(prefix, [[1, 2], [3, 4]])
    real_replace = os.replace

    def killed_before_the_index(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt  # the kill between the two renames
        real_replace(src, dst)

    import megatron.core.datasets.indexed_dataset as indexed_dataset
    monkeypatch.setattr(indexed_dataset.os, "replace", killed_before_the_index)
    with pytest.raises(KeyboardInterrupt):
        _write(prefix, [[5, 6], [7, 8]])
    monkeypatch.undo()
    # The new .bin (same size as the old) is there, the old .idx is not: refused, never trained on.
    assert bin_path(prefix).read_bytes() == np.array([5, 6, 7, 8], np.uint16).tobytes()
    with pytest.raises(IndexedDatasetError, match="ds.idx: not found"):
        IndexedDataset(prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin"]


@pytest.mark.parametrize("old, new", [([[1, 2], [3, 4]], [[5, 6], [7, 8]]), ([[1, 2, 3]], [[3], [2, 1]]),
                                      ([[9] * 300_000], [[9] * 299_999 + [8]])])
def test_an_index_of_other_data_is_refused_even_at_equal_size(tmp_path, old, new):
    _write(tmp_path / "old", old)
    _write(tmp_path / "new", new)
    shutil.copy(bin_path(tmp_path / "new"), bin_path(tmp_path / "old"))
    with pytest.raises(IndexedDatasetError, match="does not match its .idx") as error:
        IndexedDataset(tmp_path / "old")
    assert str(bin_path(tmp_path / "old")) in str(error.value) and "tools/preprocess_data.py" in str(error.value)


def _write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
        writer.finalize()


def test_zero_sequence_documents_of_megatron_keep_empty(tmp_path):
    """Megatron-LM's preprocessing writes an empty record kept with --keep-empty as a document of
    no sequences."""
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
        writer.add_document([], sequence_lengths=[])
        writer.add_document([1, 2, 3], sequence_lengths=[1, 2])
        writer.add_document([], sequence_lengths=[])
        writer.add_document([4])
        writer.finalize()
    dataset = IndexedDataset(tmp_path / "ds")
    assert dataset.document_indices.tolist() == [0, 0, 2, 2, 3] and dataset.num_documents == 4
    documents = [dataset.get_document(i).tolist() for i in range(dataset.num_documents)]
    assert documents == [[], [1, 2, 3], [], [4]]
    assert dataset.get_document(0).dtype == np.uint16 and dataset.document_lengths.tolist() == [0, 3, 0, 1]


# ----- tracebacks instead of one line --------------------------------------------------------------
def test_token_ids_beyond_the_vocabulary_are_refused_before_training(builtin_corpus_small, tmp_path, capsys):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "1"]
    nulls = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]  # the data has ids up to ~1000
    assert run(args + nulls + ["--save", tmp_path / "ckpt"]) == 2
    one_line(capsys, str(bin_path(builtin_corpus_small.data_prefix)), "the tokenizer has 101 ids", "another tokenizer")
    assert not (tmp_path / "ckpt").exists()
    # An index without our trailer (Megatron-LM's): the range is scanned once, then cached.
    prefix = tmp_path / "megatron_text_document"
    shutil.copy(bin_path(builtin_corpus_small.data_prefix), bin_path(prefix))
    idx_path(prefix).write_bytes(idx_path(builtin_corpus_small.data_prefix).read_bytes()[:-TRAILER_BYTES])
    dataset = IndexedDataset(prefix)
    low, high = dataset.token_range()
    assert 0 <= low <= high < 1024 == build_vocab(builtin_corpus_small)
    cached = list((tmp_path / "cache" / "GPTDataset_indices").glob("*-token_range.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["max"] == high
    with pytest.raises(IndexedDatasetError, match=f"token ids run from {low} to {high}"):
        dataset.check_token_ids(high)
    dataset.check_token_ids(high + 1)
    assert run(args + nulls + ["--data-path", prefix]) == 2  # the last --data-path counts
    one_line(capsys, str(bin_path(prefix)), f"run from {low} to {high}")


def build_vocab(corpus) -> int:
    return build_tokenizer(TokenizerConfig(tokenizer_type="SentencePieceTokenizer",
                                           tokenizer_model=str(corpus.tokenizer_model))).vocab_size


def test_output_paths_are_checked_before_any_work(builtin_corpus_small, tmp_path, capsys):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "1"]
    a_file, a_dir = tmp_path / "file", tmp_path / "dir"
    a_file.write_text("keep me")
    a_dir.mkdir()
    cases = [
        (["--save", a_file], "--save", "is a file"),
        (["--save", a_file / "ckpt"], "--save", "cannot be made"),
        (["--metrics-file", a_dir], "--metrics-file", "is a folder"),
        (["--metrics-file", a_file / "m.jsonl"], "--metrics-file", "is a file, not a folder"),
        (["--tensorboard-dir", a_file], "--tensorboard-dir", "is a file"),
        (["--metrics-file", tmp_path / "m.jsonl", "--loss-plot", a_dir], "--loss-plot", "is a folder"),
        (["--data-cache-path", a_file], "--data-cache-path", "is a file"),
    ]
    for extra, flag, fragment in cases:
        assert run(args + extra + ([] if "--save" in extra else ["--save", tmp_path / "ckpt"])) == 2, extra
        one_line(capsys, flag, fragment)
    assert a_file.read_text() == "keep me" and not list(a_dir.iterdir()) and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("yaml_text, fragment", [
    ("num_layers: [1, 2]", "--num-layers expects a whole number, got [1, 2]"),
    ("hidden_size: {a: 1}", "--hidden-size expects a whole number"),
    ("num_attention_heads: true", "--num-attention-heads expects a whole number, got True"),
    ("train_iters: 2.5", "--train-iters expects a whole number, got 2.5"),
    ("lr: .nan", "--lr expects a number"),
    ("weight_decay: [0.1]", "--weight-decay expects a number"),
    ("swiglu: 'yes'", "--swiglu expects true or false"),
    ("bf16: 1", "--bf16 expects true or false"),
    ("fp8_level: O5", "--fp8-level must be one of"),
    ("normalization: null", "--normalization needs a value"),
    ("tokenizer_model: {path: x}", "--tokenizer-model expects a string"),
    ("data_path: [[a, b]]", "--data-path expects a list of strings"),
])
def test_yaml_values_of_the_wrong_type(tmp_path, capsys, yaml_text, fragment):
    required = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "train_iters": 2,
                "lr": "1.0e-3"}
    key = yaml_text.split(":")[0]
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in required.items() if k != key) + yaml_text + "\n")
    assert run(["--config", config]) == 2
    one_line(capsys, fragment)


def test_yaml_values_that_convert(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num_layers: 2.0\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\ntrain_iters: 2\n"
                      "lr: 1\nsplit: 100\ndata_path: [0.5, A, 0.5, B]\nmin_lr: 0\n")
    parsed = parse_config(["--config", str(config)])
    assert (parsed.num_layers, parsed.lr, parsed.split, parsed.data_path) == (2, 1.0, "100", ["0.5", "A", "0.5", "B"])
    assert isinstance(parsed.num_layers, int) and isinstance(parsed.min_lr, float)


@pytest.mark.parametrize("extra, fragment", [
    (["--kv-channels", "0"], "--kv-channels must be positive, got 0"),
    (["--init-method-std", "-0.02"], "--init-method-std must be >= 0"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size must be positive"),
    (["--norm-epsilon", "0"], "--norm-epsilon must be > 0"),
    (["--rotary-base", "-1"], "--rotary-base must be > 0"),
    (["--init-method-std", "nan"], "--init-method-std"),
])
def test_model_ranges(builtin_corpus_small, capsys, extra, fragment):
    assert run(BASE + builtin_corpus_small.training_args() + ["--train-iters", "1"] + extra) == 2
    one_line(capsys, fragment)


def test_model_config_types():
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, max_position_embeddings=32)
    for extra, fragment in [({"num_layers": 2.5}, "--num-layers must be a whole number"),
                            ({"hidden_size": True}, "--hidden-size must be a whole number"),
                            ({"swiglu": "yes"}, "--swiglu is a switch"),
                            ({"num_query_groups": 0}, "--num-query-groups must be positive"),
                            ({"hidden_dropout": float("nan")}, "--hidden-dropout must be a finite number")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            TransformerConfig(**{**base, **extra})


def test_damaged_checkpoint_metadata_and_files(trained, tmp_path, capsys):
    args, ckpt = trained
    ckpt = copy_of(ckpt, tmp_path)
    folder = checkpointing.iteration_dir(ckpt, 2)
    (folder / MANIFEST).unlink()  # damage that a manifest would catch first; here the structure checks must
    metadata = json.loads((folder / "metadata.json").read_text())
    damaged = [({k: v for k, v in metadata.items() if k != "layout"}, "no 'layout' object"),
               (dict(metadata, layout=dict(metadata["layout"], tp="1")), "'layout' needs positive integers"),
               (dict(metadata, layout=dict(metadata["layout"], world_size=3)), "is not tp x pp x dp"),
               (dict(metadata, model=[1, 2]), "'model' is a list"),
               (dict(metadata, format="1"), "no integer 'format'"),
               ([metadata], "a JSON list, not an object")]
    for value, fragment in damaged:
        (folder / "metadata.json").write_text(json.dumps(value))
        with pytest.raises(checkpointing.CheckpointError, match=re.escape(fragment)) as error:
            checkpointing.read_metadata(str(ckpt), 2)
        assert "metadata.json is damaged" in str(error.value)
    (folder / "metadata.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(checkpointing.CheckpointError, match="metadata.json is unreadable"):
        checkpointing.read_metadata(str(ckpt), 2)
    (folder / "metadata.json").write_text(json.dumps(dict(metadata, layout={"tp": 1})))
    assert run(args + ["--load", ckpt]) == 2  # end to end: one line, not a KeyError
    one_line(capsys, "metadata.json is damaged")
    payload = torch.load(folder / "rank_00000.pt", weights_only=True)
    for edit, fragment in [(lambda p: p.pop("model"), "no 'model'"),
                           (lambda p: next(iter(p["model"].values())).pop("shard"), "no tensor or shard record"),
                           (lambda p: p.update(format=7), "format 7, this version reads 1; load it with the version"),
                           (lambda p: next(iter(p["optimizer"].values())).update(range=[0]), "no valid range")]:
        broken = {**payload, "model": {k: dict(v) for k, v in payload["model"].items()},
                  "optimizer": {k: dict(v) for k, v in payload["optimizer"].items()}}
        edit(broken)
        with pytest.raises(checkpointing.CheckpointError, match=re.escape(fragment)) as error:
            checkpointing.check_rank_payload(folder / "rank_00000.pt", broken)
        assert "rank_00000.pt" in str(error.value) and "checkpoint_convert" not in str(error.value)


# ----- messages that do not name the file or the fix ----------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe\x81\x00", "is not text"), (b"twelve\n", "does not hold an iteration number"),
    (b"-3\n", "does not hold an iteration number"), (b"", "does not hold an iteration number"),
])
def test_undecodable_tracker_names_the_file_and_the_fix(tmp_path, content, fragment):
    checkpointing.iteration_dir(tmp_path, 5).mkdir()
    (tmp_path / checkpointing.MARKER).write_bytes(content)
    with pytest.raises(checkpointing.CheckpointError, match=fragment) as error:
        checkpointing.latest_iteration(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / checkpointing.MARKER) in message and "e.g. 5" in message and "\n" not in message


def test_tracker_that_is_a_folder(tmp_path):
    (tmp_path / checkpointing.MARKER).mkdir()
    with pytest.raises(checkpointing.CheckpointError, match="cannot be read"):
        checkpointing.latest_iteration(str(tmp_path))


def test_gzip_errors_name_the_file(tmp_path, builtin_corpus_small):
    tokenizer = TokenizerConfig(tokenizer_type="SentencePieceTokenizer",
                                tokenizer_model=str(builtin_corpus_small.tokenizer_model))
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text('{"text": "not compressed"}\n')
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 1000)[:-30])
    text = tmp_path / "cut.txt.gz"
    text.write_bytes(gzip.compress(b"hello\n" * 1000)[:-30])
    for path, fragment in [(plain, "not gzip data"), (truncated, "damaged gzip data"), (text, "damaged gzip data")]:
        with pytest.raises(ValueError, match=fragment) as error:
            preprocess(PreprocessConfig(input=str(path), output_prefix=str(tmp_path / "out"), tokenizer=tokenizer,
                                        show_progress=False))
        assert str(path) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl.gz", "cut.txt.gz", "plain.jsonl.gz"]


@pytest.mark.parametrize("data_path", [["nan", "A", "1", "B"], ["1", "A", "inf", "B"], ["-inf", "A", "1", "B"]])
def test_non_finite_blend_weights_name_the_flag(data_path):
    with pytest.raises(ValueError, match="--data-path weight .* is not a finite number"):
        parse_data_path(data_path)


def test_every_tool_a_message_points_to_exists():
    sources = [p for folder in ("megatron", "fp8", "rlhf", "tools") for p in (REPO / folder).rglob("*.py")]
    sources += list(REPO.glob("*.py"))
    named = {m for p in sources for m in re.findall(r"tools/[\w/]+\.py", p.read_text())}
    assert named and all((REPO / m).is_file() for m in named), sorted(m for m in named if not (REPO / m).is_file())


# ----- a rank's line under torchrun ----------------------------------------------------------------
ONLY_RANK_1_FAILS = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import torch.distributed as dist
    from megatron.training.cli import run_cli

    def main():
        dist.init_process_group("gloo")
        if dist.get_rank() == 1:
            raise ValueError("--data-path /only/on/rank1 does not exist; pass the prefix that preprocessing wrote")
        dist.barrier()  # rank 0 waits for rank 1 until the agent ends it
        time.sleep(60)

    sys.exit(run_cli(main))
""")


def test_torchrun_shows_the_line_of_the_rank_that_failed(tmp_path):
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(ONLY_RANK_1_FAILS.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error: [rank 1]" in line]
    assert len(lines) == 1 and "/only/on/rank1 does not exist" in lines[0], proc.stderr[-3000:]


def test_rank_prefix_only_for_other_ranks(monkeypatch, capsys):
    def fail():
        raise ValueError("bad input\nsecond line dropped")

    monkeypatch.setenv("RANK", "3")
    assert run_cli(fail) == 2
    assert capsys.readouterr().err == "error: [rank 3] bad input\n"
    monkeypatch.setenv("RANK", "0")
    assert run_cli(fail) == 2
    assert capsys.readouterr().err == "error: bad input\n"
