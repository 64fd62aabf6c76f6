"""Training metrics: the metrics file, the console log line, model FLOPs and MFU, and the optional
TensorBoard / Weights & Biases loggers.

The metrics file is a contract (DESIGN.md, "Contracts other tools rely on"); docs/metrics.md
describes every key. Records may carry more keys than the contract (e.g. `val_loss`,
`consumed_samples`, `mfu_percent`); only the contract's keys are required.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch

REQUIRED_KEYS = ("iteration", "loss", "lr", "grad_norm", "skipped", "step_time_s", "tokens_per_s")
REQUIRED_GROUPS = {
    "memory": ("num_params", "weight_bytes", "grad_bytes", "master_bytes", "optim_bytes", "state_bytes_per_param"),
    "comm": ("dp_bytes", "tp_bytes", "pp_bytes"),
}
OPTIONAL_GROUPS = {"fp8": ("mu", "overflow_frac", "underflow_frac")}  # present at --fp8-level O1 and above
WANDB_MODES = ("online", "offline", "disabled")


def missing_contract_keys(record: Mapping[str, Any]) -> list[str]:
    """The contract keys `record` lacks, nested ones written `memory.grad_bytes`."""
    missing = [key for key in REQUIRED_KEYS if key not in record]
    groups = dict(REQUIRED_GROUPS, **{name: keys for name, keys in OPTIONAL_GROUPS.items() if name in record})
    for group, keys in groups.items():
        values = record.get(group)
        if not isinstance(values, Mapping):
            missing.append(group)
            continue
        missing.extend(f"{group}.{key}" for key in keys if key not in values)
    return missing


def check_contract(record: Mapping[str, Any]) -> None:
    """Internal check of the training loop's records; a failure is a bug, not a user mistake."""
    missing = missing_contract_keys(record)
    if missing:
        raise ValueError(f"metrics record for iteration {record.get('iteration')} misses contract keys: "
                         f"{', '.join(missing)} (DESIGN.md, 'Contracts other tools rely on')")


def to_json_value(value: Any, key: str = "record") -> Any:
    """`value` as plain JSON data: tensors and NumPy scalars become Python numbers, and non-finite
    floats (NaN, +-inf) become null, because strict JSON has no spelling for them."""
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics value {key} is a tensor of {value.numel()} elements; log a scalar")
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # NumPy scalars
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"metrics value {key} has type {type(value).__name__}; log a number, string or dict")


class MetricsWriter:
    """Appends one JSON object per logged iteration to `path` (JSON lines).

    Only where `enabled` (the caller passes `enabled = global rank 0`) and a path is given does it
    touch the file system. Each line is flushed as written, so a crash loses no logged iteration.
    NaN and infinities are written as `null` (see `to_json_value`). Records are checked against
    the contract keys (`check_contract`).

    `resume_from_iteration=N` drops the lines of iterations after N, which a resumed run is about
    to log again; the file is rewritten through a temporary file and `os.replace`, so a crash during
    the rewrite leaves the old file whole. Pass the iteration the run starts from (0 for a fresh
    run) so that an earlier run's lines at the same path are never mixed with this run's.
    """

    def __init__(self, path: str | os.PathLike | None, enabled: bool, *, resume_from_iteration: int | None = None):
        self.path = None if path is None else os.fspath(path)
        self.enabled = bool(enabled) and self.path is not None
        self._file = None
        if not self.enabled:
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        if resume_from_iteration is not None:
            truncate_metrics_file(self.path, resume_from_iteration)
        torn = _ends_mid_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if torn:  # a crash cut the last line short; start ours on a fresh line so they still parse
            self._file.write("\n")

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"metrics file {self.path} is closed; write before close()")
        check_contract(record)
        line = json.dumps(to_json_value(record), allow_nan=False, separators=(", ", ": "))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def truncate_metrics_file(path: str, last_iteration: int) -> int:
    """Keep the records of iterations <= `last_iteration`; returns how many lines were dropped.

    Lines that are not JSON objects with an iteration (a line torn by a crash) are dropped too.
    """
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    kept = [line for line in lines if _iteration_of_line(line, default=last_iteration + 1) <= last_iteration]
    if len(kept) == len(lines):
        return 0
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_name = tempfile.mkstemp(prefix=".metrics-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        os.chmod(tmp_name, os.stat(path).st_mode & 0o777)  # mkstemp's file is private; keep the original's mode
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise
    return len(lines) - len(kept)


def _iteration_of_line(line: str, default: int) -> int:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return default
    iteration = record.get("iteration") if isinstance(record, dict) else None
    return iteration if isinstance(iteration, int) else default


def _ends_mid_line(path: str) -> bool:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


# ---------------------------------------------------------------------------------------------
# Console line


def format_log_line(record: Mapping[str, Any], loss_name: str = "lm loss",
                    fields: Mapping[str, str] | None = None) -> str:
    """Megatron's training log line for `record` (a metrics record, plus optional keys); the loss
    is shown under `loss_name` (the task's), followed by the task's own `fields` ({record key:
    label}, e.g. an RLHF run's reward, "rlhf.reward" for a nested one) when the record has them.

    Optional keys shown when present: `train_iters`, `consumed_samples`, `elapsed_s`, `eta_s`,
    `global_batch_size`, `loss_scale`, `tflops_per_device`, `mfu_percent`, `fp8.mu`,
    `fp8.overflow_frac`, `fp8.underflow_frac`.
    """
    iteration = int(record["iteration"])
    train_iters = record.get("train_iters")
    parts = [f" iteration {iteration:8d}" + (f"/{int(train_iters):8d}" if train_iters is not None else "")]
    if "consumed_samples" in record:
        parts.append(f"consumed samples: {int(record['consumed_samples']):12d}")
    if record.get("elapsed_s") is not None:
        parts.append(f"elapsed: {format_duration(record['elapsed_s'])}")
    if record.get("eta_s") is not None:
        parts.append(f"ETA: {format_duration(record['eta_s'])}")
    if "step_time_s" in record:
        parts.append(f"elapsed time per iteration (ms): {_number(record['step_time_s'], '.1f', scale=1e3)}")
    parts.append(f"learning rate: {_number(record.get('lr'), '.6E')}")
    if "global_batch_size" in record:
        parts.append(f"global batch size: {int(record['global_batch_size']):5d}")
    parts.append(f"{loss_name}: {_number(record.get('loss'), '.6E')}")
    for key, label in (fields or {}).items():
        value = record
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            parts.append(f"{label}: {_number(value, '.4g')}")
    if "loss_scale" in record:
        parts.append(f"loss scale: {_number(record['loss_scale'], '.1f')}")
    parts.append(f"grad norm: {_number(record.get('grad_norm'), '.3f')}")
    parts.extend(_throughput_parts(record))
    parts.append(f"number of skipped iterations: {int(record.get('skipped') or 0):3d}")
    fp8 = record.get("fp8")
    if isinstance(fp8, Mapping) and "mu" in fp8:
        parts.append(f"fp8 mu: {_number(fp8['mu'], 'g')}")
        if "overflow_frac" in fp8:
            parts.append(f"fp8 overflow: {_number(fp8['overflow_frac'], '.2e')}")
        if "underflow_frac" in fp8:
            parts.append(f"fp8 underflow: {_number(fp8['underflow_frac'], '.2e')}")
    return " | ".join(parts) + " |"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded: a long run's ETA can be days, ``53:20:00``)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = int(round(max(seconds, 0.0)))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Progress:
    """`elapsed_s` (wall time since this process started training) and `eta_s` (the iterations
    left times the mean wall time per iteration so far: steps, evaluations and checkpoints
    included) for the metrics record and the console line."""

    def __init__(self, start_iteration: int, train_iters: int, clock=time.perf_counter):
        self.start_iteration, self.train_iters, self.clock = start_iteration, train_iters, clock
        self.started = clock()

    def metrics(self, iteration: int) -> dict[str, float]:
        elapsed = self.clock() - self.started
        done = iteration - self.start_iteration
        eta = elapsed / done * max(self.train_iters - iteration, 0) if done > 0 else None
        return {"elapsed_s": elapsed, "eta_s": eta}


def _throughput_parts(record: Mapping[str, Any]) -> list[str]:
    parts = []
    if "tokens_per_s" in record:
        parts.append(f"tokens/s: {_number(record['tokens_per_s'], ',.0f')}")
    if record.get("tflops_per_device") is not None:
        parts.append(f"TFLOP/s/device: {_number(record['tflops_per_device'], '.1f')}")
    if record.get("mfu_percent") is not None:
        parts.append(f"MFU: {_number(record['mfu_percent'], '.1f')}%")
    return parts


def format_eval_line(iteration: int, loss: float, split: str = "validation", loss_name: str = "lm loss") -> str:
    """Megatron's evaluation line: the loss and its perplexity (exp capped so it cannot overflow)."""
    perplexity = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    return (f" {split} loss at iteration {iteration} | {loss_name} value: {loss:.6E} | "
            f"{loss_name} PPL: {perplexity:.6E} |")


def _number(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "nan"
    value = float(value.item() if hasattr(value, "item") else value) * scale
    return format(value, spec) if math.isfinite(value) else str(value)


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def model_flops_per_token(num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
                          num_query_groups: int | None, seq_length: int, vocab_size: int, swiglu: bool) -> float:
    """Training FLOPs per token of a GPT, Megatron's MFU convention (a multiply-add is 2 FLOPs).

    Per layer and token, forward, with h = hidden, f = ffn hidden, s = sequence length,
    g / a = query groups / attention heads (so the key and value width is h g / a):
        QKV projection          2 h (h + 2 h g / a)
        scores QK^T and PV      4 s h        (the full s x s, not halved for the causal mask)
        output projection       2 h^2
        MLP                     4 h f (GeLU: two GEMMs) or 6 h f (SwiGLU: three)
    plus the logits, 2 h V, once. Training is 3x the forward (the backward computes the gradients
    of both inputs and weights). Pass the padded vocabulary size. Norms, softmax, activations and
    the embedding lookup are not counted, as in Megatron.
    """
    _check_positive(num_layers=num_layers, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size,
                    num_attention_heads=num_attention_heads, seq_length=seq_length, vocab_size=vocab_size)
    num_query_groups = num_attention_heads if num_query_groups is None else num_query_groups
    h = float(hidden_size)
    kv_width = h * num_query_groups / num_attention_heads
    qkv = 2 * h * (h + 2 * kv_width)
    attention = 4 * seq_length * h
    projection = 2 * h * h
    mlp = (6 if swiglu else 4) * h * ffn_hidden_size
    logits = 2 * h * vocab_size
    forward = num_layers * (qkv + attention + projection + mlp) + logits
    return 3 * forward


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise ValueError(f"model_flops_per_token: {name} must be >= 1, got {value}")


# Dense (no structured sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets:
# (device-name pattern, BF16/FP16, FP8). Earlier patterns win, so variants precede the base name.
_PEAK_TFLOPS = (
    ("GH200", 989.4, 1978.9),
    ("H200 NVL", 835.5, 1670.5),
    ("H200", 989.4, 1978.9),
    ("H100 NVL", 835.5, 1670.5),
    ("H100 PCIe", 756.5, 1513.0),
    ("H100", 989.4, 1978.9),  # SXM
    ("H800", 989.4, 1978.9),
    ("B200", 2250.0, 4500.0),
    ("A100", 312.0, None),  # no FP8 tensor cores
    ("A800", 312.0, None),
    ("L40S", 362.05, 733.0),
    ("L40", 181.05, 362.05),
    ("L4", 121.0, 242.5),
    ("MI300X", 1307.4, 2614.9),
)
_DTYPE_COLUMN = {"bf16": 1, "bfloat16": 1, "fp16": 1, "float16": 1, "half": 1,
                 "fp8": 2, "float8": 2, "e4m3": 2, "hybrid": 2, "fp32": None, "float32": None}


def peak_flops(device: torch.device | str, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for `dtype` ("bf16", "fp16" or "fp8"); None for CPUs,
    unknown devices, FP32 and FP8 where the device has no FP8 tensor cores (then MFU is not shown)."""
    device = torch.device(device)
    if dtype.lower() not in _DTYPE_COLUMN:
        raise ValueError(f"peak_flops: dtype {dtype!r} is not one of {', '.join(_DTYPE_COLUMN)}")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


def peak_flops_for_name(device_name: str, dtype: str) -> float | None:
    """`peak_flops` from a name as `torch.cuda.get_device_name` reports it, e.g. "NVIDIA H100 80GB HBM3"."""
    column = _DTYPE_COLUMN.get(dtype.lower())
    if column is None:
        return None
    for pattern, *tflops in _PEAK_TFLOPS:
        # \b keeps "L4" from matching "L40S" and "H200" from matching "GH200".
        if re.search(rf"\b{re.escape(pattern)}\b", device_name):
            value = tflops[column - 1]
            return None if value is None else value * 1e12
    return None


def throughput_metrics(tokens_per_s: float, flops_per_token: float, num_devices: int,
                       peak_flops_per_device: float | None) -> dict[str, float]:
    """`tflops_per_device` (model FLOP/s achieved per device, in TFLOP/s) and, where the peak is
    known, `mfu_percent`; `tokens_per_s` is the whole job's."""
    achieved_per_device = tokens_per_s * flops_per_token / num_devices
    result = {"tflops_per_device": achieved_per_device / 1e12}
    if peak_flops_per_device:
        result["mfu_percent"] = 100.0 * achieved_per_device / peak_flops_per_device
    return result


# ---------------------------------------------------------------------------------------------
# TensorBoard and Weights & Biases


# Megatron-LM's TensorBoard / W&B names for the record's keys (its dashboards plot these), and the
# ones it also writes against the consumed samples ("... vs samples"). "loss" and "val_loss" take
# the task's loss name: "lm loss", "lm loss validation".
UPSTREAM_TAGS = {"lr": "learning-rate", "global_batch_size": "batch-size", "grad_norm": "grad-norm",
                 "loss_scale": "loss-scale", "step_time_s": "iteration-time"}
VS_SAMPLES = ("learning-rate", "batch-size", "grad-norm", "loss-scale")


def upstream_scalars(record: Mapping[str, Any], loss_name: str = "lm loss") -> dict[str, float]:
    """`flatten_scalars` with Megatron-LM's names where it has one (`UPSTREAM_TAGS`, the loss as
    `loss_name`, the validation loss as "`loss_name` validation"); other keys as flattened."""
    names = dict(UPSTREAM_TAGS, loss=loss_name, val_loss=f"{loss_name} validation")
    return {names.get(key, key): value for key, value in flatten_scalars(record).items()}


def flatten_scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of `record` as one series each ("memory/weight_bytes"); strings, None and
    the iteration itself (the x axis) are left out."""
    scalars: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            scalars.update(flatten_scalars(value, prefix=f"{name}/"))
            continue
        if name == "iteration":
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        elif hasattr(value, "item") and getattr(value, "size", 1) == 1:  # NumPy scalars
            value = value.item()
        if isinstance(value, numbers.Real):  # bool included: skipped counts as 0 / 1
            scalars[name] = float(value)
    return scalars


class Loggers:
    """TensorBoard (`tensorboard_dir`) and Weights & Biases (`wandb_project`) behind one `log`.

    Neither backend is imported unless asked for. Every rank checks that the packages are
    installed, so a missing one stops all ranks alike; only where `enabled` (global rank 0, as
    for the metrics file) are files written and runs started. `wandb_mode` None follows the
    WANDB_MODE environment variable (wandb's default: online). `run_config` (the run's flags, a
    dict or an argparse Namespace) goes to W&B as its config and to TensorBoard as a text summary.
    Series carry Megatron-LM's names (`upstream_scalars`: "lm loss", "learning-rate", ...), so
    dashboards made for it work; TensorBoard also gets its "... vs samples" series.
    """

    def __init__(self, *, tensorboard_dir: str | None = None, wandb_project: str | None = None,
                 wandb_exp_name: str | None = None, wandb_save_dir: str | None = None,
                 wandb_mode: str | None = None, enabled: bool = True,
                 run_config: Mapping[str, Any] | argparse.Namespace | None = None, loss_name: str = "lm loss"):
        self.loss_name = loss_name
        if wandb_mode not in (None, *WANDB_MODES):
            raise ValueError(f"--wandb-mode {wandb_mode!r}: choose one of {', '.join(WANDB_MODES)}")
        self.tensorboard = None
        self.wandb_run = None
        if tensorboard_dir:
            _require_package("tensorboard", "--tensorboard-dir", "tensorboard")
        if wandb_project:
            _require_package("wandb", "--wandb-project", "wandb")
        if not enabled:
            return
        if isinstance(run_config, argparse.Namespace):
            run_config = vars(run_config)
        run_config = _plain_config(run_config or {})
        if tensorboard_dir:
            self.tensorboard = _start_tensorboard(tensorboard_dir, run_config)
        if wandb_project:
            try:
                self.wandb_run = _start_wandb(wandb_project, wandb_exp_name, wandb_save_dir, wandb_mode, run_config)
            except ValueError:
                self.close()  # the event file so far stays readable
                raise

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb_run is not None

    def log(self, record: Mapping[str, Any], iteration: int, samples: int | None = None) -> None:
        """`record`'s numbers at `iteration`, and against `samples` (default: the record's
        `consumed_samples`) for the series Megatron-LM also plots that way."""
        if not self.active:
            return
        scalars = upstream_scalars(record, self.loss_name)
        samples = record.get("consumed_samples") if samples is None else samples
        if self.tensorboard is not None:
            vs_samples = {*VS_SAMPLES, self.loss_name, f"{self.loss_name} validation"}
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, iteration)
                if samples is not None and name in vs_samples:
                    self.tensorboard.add_scalar(f"{name} vs samples", value, int(samples))
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's flags as JSON data; values JSON cannot hold (a torch.dtype, a Path) become text,
    since a config summary must never stop a run."""
    plain = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            plain[str(key)] = _plain_config(value)
            continue
        try:
            plain[str(key)] = to_json_value(value, str(key))
        except ValueError:
            plain[str(key)] = str(value)
    return plain


def _require_package(module: str, flag: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{flag} needs the {pip_name} package: pip install {pip_name} "
                         "(or pip install 'fp8-lm[logging]'), or drop the flag")


def _start_tensorboard(log_dir: str, run_config: dict[str, Any]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard present but unusable (e.g. a protobuf clash)
        raise ValueError(f"--tensorboard-dir: TensorBoard cannot be imported ({exc}); reinstall tensorboard") from exc
    writer = SummaryWriter(log_dir=log_dir)
    if run_config:
        # Indented four spaces, TensorBoard's markdown shows the JSON as a code block.
        text = "\n".join("    " + line for line in json.dumps(run_config, indent=2, sort_keys=True).splitlines())
        writer.add_text("config", text, 0)
    return writer


def _start_wandb(project: str, name: str | None, save_dir: str | None, mode: str | None,
                 run_config: dict[str, Any]):
    try:
        wandb = importlib.import_module("wandb")
    except ImportError as exc:  # installed but broken, e.g. a protobuf version clash
        raise ValueError(f"--wandb-project: wandb cannot be imported ({exc}); reinstall it: pip install -U wandb") from exc
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    try:
        return wandb.init(project=project, name=name or None, dir=save_dir or None, mode=mode,
                          config=run_config)
    except Exception as exc:  # noqa: BLE001 -- wandb raises its own types for login and network trouble
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"W&B could not start a run ({first_line}); run `wandb login`, "
                         "or log offline with --wandb-mode offline") from exc
