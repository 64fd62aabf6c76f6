"""tools/plot_metrics.py: images from metrics files, and the one-line error contract on bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tools/ is not an installed package; plain `pytest` does not add the root
    sys.path.insert(0, str(REPO))

from tools.plot_metrics import plot_metrics, read_series  # noqa: E402

SCRIPT = REPO / "tools" / "plot_metrics.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, num_iterations: int = 20, scale: float = 1.0) -> Path:
    lines = []
    for iteration in range(1, num_iterations + 1):
        loss = scale * 5.0 * math.exp(-iteration / 10)
        record = {"iteration": iteration, "loss": None if iteration == 7 else loss, "lr": 1e-3 * min(1.0, iteration / 5),
                  "fp8": {"mu": 1.0, "overflow_frac": 0.0, "underflow_frac": 0.0}}
        lines.append(json.dumps(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_function_plots_several_runs(tmp_path):
    runs = [write_metrics(tmp_path / "a" / "metrics.jsonl"), write_metrics(tmp_path / "b" / "metrics.jsonl", scale=0.8)]
    out = tmp_path / "plots" / "loss.png"
    assert plot_metrics(runs, str(out), labels=["bf16", "fp8"]) == str(out)
    assert_png(out)
    plot_metrics(runs, str(tmp_path / "mu.png"), key="fp8.mu", log_scale=True)  # nested key, same-named files
    assert_png(tmp_path / "mu.png")
    assert sorted(p.name for p in out.parent.iterdir()) == ["loss.png"]  # no temporary file left


def test_null_values_become_gaps_and_keyless_records_are_skipped(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", num_iterations=8)
    with open(path, "a") as handle:
        handle.write(json.dumps({"iteration": 8, "val_loss": 1.5}) + "\n\n")
    iterations, values = read_series(str(path), "loss")
    assert iterations == list(range(1, 9)) and math.isnan(values[6])
    assert read_series(str(path), "val_loss") == ([8], [1.5])


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_command_line_writes_the_image(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    result = run_tool("metrics.jsonl", "--out", "curves/loss.png", "--labels", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "wrote curves/loss.png"
    assert_png(tmp_path / "curves" / "loss.png")


BAD_INPUTS = {
    "missing file": (None, [], "missing.jsonl: no such metrics file"),
    "empty file": ("", [], "bad.jsonl: empty, no logged iterations"),
    "not JSON": ('{"iteration": 1, "loss": 2.0}\n{"iteration": 2, "lo\n', [], "bad.jsonl:2: not JSON"),
    "not an object": ("[1, 2]\n", [], "bad.jsonl:1: a JSON list, not an object"),
    "key absent": ('{"iteration": 1, "loss": 2.0, "lr": 0.1}\n', ["--key", "grad_norm"],
                   "bad.jsonl: no record has 'grad_norm'; choose a --key among: loss, lr"),
    "text value": ('{"iteration": 1, "loss": "low"}\n', [], "bad.jsonl:1: 'loss' is 'low', not a number"),
    "no iteration": ('{"loss": 2.0}\n', [], "bad.jsonl:1: the record has no integer 'iteration'"),
    "labels count": ('{"iteration": 1, "loss": 2.0}\n', ["--labels", "a", "b"], "--labels: 2 labels for 1 files"),
    "image format": ('{"iteration": 1, "loss": 2.0}\n', ["--out", "out/loss.xyz"], "cannot write .xyz"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_image(tmp_path, case):
    content, extra_args, message = BAD_INPUTS[case]
    name = "missing.jsonl" if content is None else "bad.jsonl"
    if content is not None:
        (tmp_path / name).write_text(content)
    args = [name, *extra_args] if "--out" in extra_args else [name, "--out", "out/loss.png", *extra_args]
    result = run_tool(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == []


def test_runs_are_named_by_their_folders_and_validation_losses_are_drawn(tmp_path):
    from tools.plot_metrics import make_figure

    bf16, fp8 = write_metrics(tmp_path / "bf16" / "metrics.jsonl"), write_metrics(tmp_path / "fp8-O3" / "metrics.jsonl")
    with open(fp8, "a") as handle:  # evaluations logged at 10 and 20 (one in its own record, as log_eval's)
        handle.write(json.dumps({"iteration": 10, "val_loss": 2.5}) + "\n")
        handle.write(json.dumps({"iteration": 20, "val_loss": 1.5}) + "\n")
    figure = make_figure([bf16, fp8])
    main = figure.axes[0]
    labels = main.get_legend_handles_labels()[1]
    assert labels == ["bf16", "fp8-O3", "fp8-O3 validation"]
    lines = {line.get_label(): line for line in main.get_lines()}
    assert list(lines["fp8-O3 validation"].get_xdata()) == [10, 20]
    assert list(lines["fp8-O3 validation"].get_ydata()) == [2.5, 1.5]
    assert lines["fp8-O3 validation"].get_color() == lines["fp8-O3"].get_color()
    # --labels wins; files of one folder go by their file names; other keys show no validation
    assert make_figure([bf16, fp8], labels=["a", "b"]).axes[0].get_legend_handles_labels()[1] == [
        "a", "b", "b validation"]
    same_folder = [write_metrics(tmp_path / "c" / "x.jsonl"), write_metrics(tmp_path / "c" / "y.jsonl")]
    assert make_figure(same_folder).axes[0].get_legend_handles_labels()[1] == ["x", "y"]
    assert make_figure([fp8], key="lr").axes[0].get_legend_handles_labels()[1] == ["fp8-O3"]
