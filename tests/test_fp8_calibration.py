"""--fp8-min-features auto (fp8/calibration.py): the size filter from a GPU's calibration file,
the default without one, the value a resumed checkpoint was trained with, and one-line errors for
files that cannot be used."""

import json
import os

import pytest
import torch

from fp8.calibration import DEFAULT_MIN_FEATURES, CalibrationError, load, resolve_min_features, shipped

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(**overrides):
    base = {"format_version": 1, "device_name": "NVIDIA H200", "capability": [9, 0], "torch": "2.11",
            "fused_casts": True, "tokens": 8192, "widths": [1024, 2048, 4096, 8192],
            "fp8_min_features": {"delayed": 2048, "current": 4096, "rowwise": None, "blockwise": 8192}}
    return dict(base, **overrides)


def write(folder, name, content):
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_thresholds_from_a_file(tmp_path):
    calibration = load(write(tmp_path, "c.json", record()))
    assert [calibration.threshold(r) for r in ("delayed", "current", "blockwise")] == [2048, 4096, 8192]
    # Slower at every measured width: FP8 only above the widest one measured.
    assert calibration.threshold("rowwise") == 8193
    value, why = resolve_min_features("delayed", torch.device("cpu"), path=tmp_path / "c.json")
    assert value == 2048 and "NVIDIA H200" in why


def test_default_without_a_gpu_or_a_file(tmp_path):
    assert resolve_min_features("delayed", torch.device("cpu"), directory=tmp_path)[0] == DEFAULT_MIN_FEATURES


def test_shipped_lookup_by_device_name_and_cast_mode(tmp_path):
    write(tmp_path, "a.json", record(fused_casts=False, fp8_min_features={"delayed": 8192}))
    write(tmp_path, "b.json", record(fp8_min_features={"delayed": 1024}))
    write(tmp_path, "c.json", record(device_name="NVIDIA H100 80GB HBM3", fp8_min_features={"delayed": 4096}))
    write(tmp_path, "README.md", "not a calibration")
    assert shipped("NVIDIA H200", True, tmp_path).threshold("delayed") == 1024
    assert shipped("NVIDIA H200", False, tmp_path).threshold("delayed") == 8192
    assert shipped("NVIDIA H100 80GB HBM3", True, tmp_path).threshold("delayed") == 4096
    assert shipped("NVIDIA B200", True, tmp_path) is None


def test_committed_calibrations_parse():
    from fp8.calibration import CALIBRATION_DIR, parse

    for path in CALIBRATION_DIR.glob("*.json"):
        parse(json.loads(path.read_text()), str(path))


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not a calibration file"),
    (record(format_version=7), "format_version must be 1"),
    (record(widths=[]), "widths must be a list of positive whole numbers"),
    (record(fp8_min_features={"delayed": "wide"}), "fp8_min_features must map recipes to a width or null"),
    (record(device_name=None), "device_name is missing"),
])
def test_unusable_files_are_one_line_errors(tmp_path, content, message):
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(CalibrationError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value) and "bench/gpu_suite.py" in str(info.value)


def test_missing_file_and_missing_recipe(tmp_path):
    with pytest.raises(CalibrationError, match="no such file"):
        load(tmp_path / "nothing.json")
    calibration = load(write(tmp_path, "c.json", record(fp8_min_features={"delayed": 1024})))
    with pytest.raises(CalibrationError, match="no measurement for --fp8-recipe rowwise"):
        calibration.threshold("rowwise")


# ----- through the trainer ---------------------------------------------------------------------
def train(corpus, tmp_path, name, *flags):
    import pretrain_gpt

    metrics = tmp_path / f"{name}.jsonl"
    argv = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--eval-iters", "0", "--lr-warmup-iters", "1", "--log-interval", "1", "--fp8-level", "O2",
            *corpus.training_args(), "--metrics-file", str(metrics), *flags]
    assert pretrain_gpt.main(argv) == 0
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def summary(records):
    return [(r["iteration"], r["loss"], r["grad_norm"], r["memory"]["grad_bytes"]) for r in records]


def test_trainer_takes_the_calibrated_width(builtin_corpus_small, tmp_path, capsys):
    # gpt-tiny's linears are 128 wide on one side: a calibrated 256 keeps them all in BF16.
    path = write(tmp_path, "h200.json", record(fp8_min_features={"delayed": 256}))
    calibrated = train(builtin_corpus_small, tmp_path, "auto", "--train-iters", "2", "--fp8-min-features", "auto",
                       "--fp8-calibration", str(path))
    assert f"--fp8-min-features auto: 256, measured on NVIDIA H200 ({path})" in capsys.readouterr().out
    assert summary(calibrated) == summary(train(builtin_corpus_small, tmp_path, "256", "--train-iters", "2",
                                                "--fp8-min-features", "256"))
    all_fp8 = train(builtin_corpus_small, tmp_path, "128", "--train-iters", "2", "--fp8-min-features", "128")
    # FP8 weight gradients (1 byte) at 128; FP32 ones for every weight at 256.
    assert all_fp8[0]["memory"]["grad_bytes"] < calibrated[0]["memory"]["grad_bytes"]


def test_resume_keeps_the_width_it_was_trained_with(builtin_corpus_small, tmp_path, capsys):
    straight = train(builtin_corpus_small, tmp_path, "straight", "--train-iters", "4", "--fp8-min-features", "256")
    save = str(tmp_path / "ckpt")
    train(builtin_corpus_small, tmp_path, "first", "--train-iters", "4", "--exit-interval", "2",
          "--fp8-min-features", "256", "--save", save)
    with open(os.path.join(save, "iter_0000002", "metadata.json")) as f:
        assert json.load(f)["fp8_min_features"] == 256
    capsys.readouterr()
    # auto on resume: the checkpoint's 256, not this machine's 128 (nor gpt-tiny.yaml's 64).
    resumed = train(builtin_corpus_small, tmp_path, "resumed", "--train-iters", "4", "--fp8-min-features", "auto",
                    "--load", save)
    assert f"--fp8-min-features auto: 256, as the checkpoint in {save} was trained" in capsys.readouterr().out
    assert summary(resumed) == summary(straight)[2:]


def test_calibration_with_an_explicit_width_is_refused(builtin_corpus_small, tmp_path, capsys):
    import pretrain_gpt
    from megatron.training.cli import run_cli

    path = write(tmp_path, "h200.json", record())
    argv = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--train-iters", "1",
            *builtin_corpus_small.training_args(), "--fp8-calibration", str(path)]
    assert run_cli(lambda: pretrain_gpt.main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --fp8-calibration applies to --fp8-min-features auto, but the run has "
                              "--fp8-min-features 64")
    bad = write(tmp_path, "bad.json", "{")
    assert run_cli(lambda: pretrain_gpt.main(argv[:-1] + [str(bad), "--fp8-min-features", "auto"])) == 2
    assert "is not a calibration file" in capsys.readouterr().err
