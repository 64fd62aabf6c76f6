"""Plot a metric (default: the loss) against the iteration from one or more metrics files.

    python tools/plot_metrics.py runs/bf16/metrics.jsonl runs/fp8-O3/metrics.jsonl --out loss.png \
        [--labels bf16 fp8-O3] [--key loss] [--log-scale]

One line per file, labelled with the run's name: its folder (`runs/bf16/metrics.jsonl` is "bf16"),
or `--labels`. The loss plot marks each run's validation losses (`val_loss`, where evaluations
were logged) in its colour. Where the files carry `lr`, a second panel shows the learning rate. Nested keys
are written with a dot or a slash (`memory.weight_bytes`, `fp8/mu`). Records without the key (an
evaluation-only record, say) are skipped; a null value (NaN or inf in training) leaves a gap.
The figure is rendered off-screen (Agg) and written through a temporary file, so a failed run
leaves no half-written image.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import OneLineErrorParser, run_cli  # noqa: E402

Series = tuple[list[int], list[float]]


def read_series(path: str, key: str) -> Series:
    """(iterations, values) of `key` in the metrics file at `path`; ValueError names the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such metrics file; pass the --metrics-file of a training run")
    iterations, values = [], []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _parse_line(path, line_number, line)
            value = _lookup(record, key)
            if value is _ABSENT:
                continue
            iterations.append(_iteration_of(path, line_number, record))
            values.append(_as_float(path, line_number, key, value))
    if not iterations:
        raise ValueError(_no_data_message(path, key))
    return iterations, values


def _parse_line(path: str, line_number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{line_number}: not JSON ({exc.msg}); each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number}: a JSON {type(record).__name__}, not an object with an iteration")
    return record


_ABSENT = object()


def _lookup(record: dict, key: str):
    value = record
    for part in key.replace("/", ".").split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _iteration_of(path: str, line_number: int, record: dict) -> int:
    iteration = record.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool):
        raise ValueError(f"{path}:{line_number}: the record has no integer 'iteration'")
    return iteration


def _as_float(path: str, line_number: int, key: str, value) -> float:
    if value is None:  # the metrics file writes NaN and inf as null
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}:{line_number}: {key!r} is {value!r}, not a number; choose a numeric --key")
    return float(value)


def _no_data_message(path: str, key: str) -> str:
    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), None)
    if first is None:
        return f"{path}: empty, no logged iterations; plot it after the first --log-interval"
    present = ", ".join(sorted(_numeric_keys(json.loads(first))))
    return f"{path}: no record has {key!r}; choose a --key among: {present}"


def _numeric_keys(record: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in record.items():
        if isinstance(value, dict):
            keys.extend(_numeric_keys(value, f"{prefix}{name}."))
        elif name != "iteration" and (value is None or isinstance(value, (int, float))):
            keys.append(f"{prefix}{name}")
    return keys


def plot_loss_if_asked(config, ps) -> None:
    """The training entry points' --loss-plot: the run's metrics file, plotted by global rank 0."""
    if config.logging.loss_plot and ps.rank == 0:
        plot_metrics([config.logging.metrics_file], config.logging.loss_plot)
        print(f"> loss curve: {config.logging.loss_plot}", flush=True)


def plot_metrics(paths: Sequence[str], out: str, labels: Sequence[str] | None = None, key: str = "loss",
                 log_scale: bool = False) -> str:
    """Plot `key` (and `lr`, where present) against the iteration; returns `out`.

    All input is read and checked before anything is written; ValueError on bad input.
    """
    figure = make_figure(paths, labels=labels, key=key, log_scale=log_scale)
    _save_atomically(figure, out, _image_format(out))
    return out


def make_figure(paths: Sequence[str], labels: Sequence[str] | None = None, key: str = "loss",
                log_scale: bool = False):
    """The figure `plot_metrics` writes (a matplotlib `Figure`, not shown anywhere)."""
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise ValueError("no metrics file given; pass one or more METRICS.jsonl")
    labels = _labels_for(paths, labels)
    curves = [read_series(path, key) for path in paths]
    lr_curves = [_optional_series(path, "lr") for path in paths] if key != "lr" else []
    val_curves = [_optional_series(path, "val_loss") for path in paths] if key == "loss" else []
    return _draw(curves, lr_curves, labels, key, log_scale, val_curves)


def _labels_for(paths: list[str], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"--labels: {len(labels)} labels for {len(paths)} files; give one label per file")
        return list(labels)
    # A run's name is its folder (runs/bf16/metrics.jsonl: "bf16"); files of one folder go by their names.
    for names in ([Path(path).resolve().parent.name for path in paths], [Path(path).stem for path in paths]):
        if all(names) and len(set(names)) == len(names):
            return names
    return [str(Path(path).with_suffix("")) for path in paths]


def _optional_series(path: str, key: str) -> Series | None:
    try:
        return read_series(path, key)
    except ValueError:
        return None  # only a missing key can fail here: the file was read once already


def _draw(curves: list[Series], lr_curves: list[Series | None], labels: list[str], key: str, log_scale: bool,
          val_curves: list[Series | None] = ()):
    # Figure and the Agg canvas directly, not pyplot: no global state, no display needed, and the
    # training script's own matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_lr = any(curve is not None for curve in lr_curves)
    figure = Figure(figsize=(8, 6.5 if with_lr else 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if with_lr else 1, 1, sharex=True, squeeze=False, height_ratios=[3, 1] if with_lr else [1])
    main = axes[0][0]
    for index, ((iterations, values), label) in enumerate(zip(curves, labels)):
        # Markers only on short runs, where a line alone could hide a single logged point.
        (line,) = main.plot(iterations, values, label=label, linewidth=1.2,
                            marker="." if len(iterations) < 30 else None)
        validation = val_curves[index] if index < len(val_curves) else None
        if validation is not None:
            main.plot(*validation, linestyle="--", linewidth=0.8, marker="o", markersize=4, color=line.get_color(),
                      label=f"{label} validation")
    main.set_ylabel(key)
    if log_scale:
        main.set_yscale("log")
    main.grid(True, alpha=0.3)
    main.legend()
    if with_lr:
        _draw_lr(axes[1][0], lr_curves, labels)
    axes[-1][0].set_xlabel("iteration")
    return figure


def _draw_lr(axis, lr_curves: list[Series | None], labels: list[str]) -> None:
    for curve, label in zip(lr_curves, labels):
        if curve is not None:
            axis.plot(*curve, label=label, linewidth=1.0)
    axis.set_ylabel("learning rate")
    axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axis.grid(True, alpha=0.3)


def _image_format(out: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    image_format = Path(out).suffix.lstrip(".").lower() or "png"
    if image_format not in FigureCanvasAgg.get_supported_filetypes():
        raise ValueError(f"--out {out}: cannot write .{image_format}; use .png, .pdf or .svg")
    return image_format


def _save_atomically(figure, out: str, image_format: str) -> None:
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            figure.savefig(tmp, format=image_format, dpi=120)
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes it private; an image is not
        os.replace(tmp_name, out_path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="plot_metrics.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics_files", nargs="+", metavar="METRICS.jsonl", help="metrics files of training runs")
    parser.add_argument("--out", default=None, help="image to write (.png, .pdf, .svg); default: FIRST_FILE_KEY.png")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend entries, one per file (default: each file's folder name, the run's name)")
    parser.add_argument("--key", default="loss", help="the metric to plot; nested keys as memory.weight_bytes")
    parser.add_argument("--log-scale", action="store_true", help="logarithmic y axis for the metric")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or str(Path(args.metrics_files[0]).with_suffix("")) + f"_{args.key.replace('/', '.')}.png"
    plot_metrics(args.metrics_files, out, labels=args.labels, key=args.key, log_scale=args.log_scale)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
