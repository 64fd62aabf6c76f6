"""Which linears are wide enough for FP8 GEMMs to pay off, from a measurement on the GPU.

An FP8 linear costs its casts (activation, weight, output gradient) on top of a GEMM that is
faster than BF16's; below some width the casts cost more than the faster GEMM saves, and the layer
is better left in BF16 (torchao filters small shapes the same way). `bench/gpu_suite.py`
measures a transformer layer's four linears (qkv, proj, fc1, fc2 at hidden sizes 1024-8192) as
`FP8Linear`s training as O1-O3 do (FP8 weight gradients accumulated over several micro-batches,
weights cast once per step) against BF16 `nn.Linear`s, forward + backward, and writes a
*calibration file* recording what it measured (shapes, tokens, micro-batches): per recipe, the
narrowest hidden size from which FP8 is faster at every wider one measured (None: slower at every
width). `--fp8-min-features auto`
(the default) takes its threshold from there:

- from `--fp8-calibration FILE` when given;
- else from a calibration shipped in `fp8/calibrations/` for this GPU's name (none is shipped
  until a run on that GPU is committed there);
- else `DEFAULT_MIN_FEATURES`, which is also the answer on a CPU, where FP8 is an emulation for
  numerics and no width gains speed.

A recipe measured slower at every width keeps FP8 only for linears wider than any measured width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MIN_FEATURES = 128
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibrations"
FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message is one line naming the fix."""


@dataclass(frozen=True)
class Calibration:
    device_name: str
    widths: tuple[int, ...]
    min_features: dict[str, int | None]  # per recipe; None: FP8 slower at every measured width
    fused_casts: bool
    source: str

    def threshold(self, recipe: str) -> int:
        """The `min_features` for `recipe`."""
        if recipe not in self.min_features:
            raise CalibrationError(f"{self.source} has no measurement for --fp8-recipe {recipe} (it has "
                                   f"{', '.join(sorted(self.min_features))}); rerun bench/gpu_suite.py --sections "
                                   "fp8_linear, or pass --fp8-min-features N")
        width = self.min_features[recipe]
        return max(self.widths) + 1 if width is None else width


def calibration_record(results: dict, *, device_name: str, fused_casts: bool, torch_version: str,
                       capability: list[int] | None) -> dict:
    """The calibration file's content, from `bench/gpu_suite.py`'s fp8_linear section."""
    widths = sorted({row["in_features"] for row in results["rows"]})
    return {"format_version": FORMAT_VERSION, "device_name": device_name, "capability": capability,
            "torch": torch_version, "fused_casts": fused_casts, "tokens": results["rows"][0]["tokens"],
            "micro_batches": results["rows"][0].get("micro_batches", 1),
            "shapes": results["rows"][0].get("shapes"), "fp8_wgrad": any(row.get("fp8_wgrad") for row in results["rows"]),
            "widths": widths, "fp8_min_features": dict(results["fp8_min_features"])}


def load(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"--fp8-calibration {path}: no such file; write one with bench/gpu_suite.py") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"--fp8-calibration {path} is not a calibration file ({exc}); write one with "
                               "bench/gpu_suite.py") from None
    return parse(record, str(path))


def parse(record, source: str) -> Calibration:
    def bad(what: str) -> CalibrationError:
        return CalibrationError(f"{source} is not a usable calibration file ({what}); write one with "
                                "bench/gpu_suite.py")

    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version must be {FORMAT_VERSION}")
    widths, per_recipe = record.get("widths"), record.get("fp8_min_features")
    if not (isinstance(widths, list) and widths and all(type(w) is int and w > 0 for w in widths)):
        raise bad("widths must be a list of positive whole numbers")
    if not (isinstance(per_recipe, dict) and per_recipe
            and all(v is None or type(v) is int and v >= 0 for v in per_recipe.values())):
        raise bad("fp8_min_features must map recipes to a width or null")
    if not isinstance(record.get("device_name"), str):
        raise bad("device_name is missing")
    return Calibration(record["device_name"], tuple(widths), dict(per_recipe), bool(record.get("fused_casts")),
                       source)


def shipped(device_name: str, fused_casts: bool, directory: Path = CALIBRATION_DIR) -> Calibration | None:
    """The calibration in `directory` measured on a GPU of this name, preferring one measured
    with the same cast mode; None if there is none."""
    found = [parse(json.loads(p.read_text()), str(p)) for p in sorted(directory.glob("*.json"))]
    found = [c for c in found if c.device_name == device_name]
    found.sort(key=lambda c: c.fused_casts != fused_casts)
    return found[0] if found else None


def configured_min_features(value: int | None, path: str | Path | None, recipe: str) -> int:
    """`--fp8-min-features` as given, or under auto (None) the `--fp8-calibration` file's width
    for `recipe`, else the default: what the flags alone say (the trainer also consults the GPU's
    own calibration and a resumed checkpoint, `resolve_min_features`)."""
    if value is not None:
        return value
    return DEFAULT_MIN_FEATURES if path is None else load(path).threshold(recipe)


def check_flags(value: int | None, path: str | Path | None) -> None:
    """The command line's pair, before anything resolves `auto`: a calibration with a width is refused."""
    if value is not None and path is not None:
        raise CalibrationError(f"--fp8-calibration applies to --fp8-min-features auto, but the run has "
                               f"--fp8-min-features {value} (from the command line or --config file); "
                               "pass --fp8-min-features auto or drop --fp8-calibration")


def resolve_min_features(recipe: str, device: torch.device, *, path: str | Path | None = None,
                         fused_casts: bool = False, directory: Path = CALIBRATION_DIR) -> tuple[int, str]:
    """(min_features, why) for `--fp8-min-features auto` on `device`."""
    if path is not None:
        calibration = load(path)
        return calibration.threshold(recipe), f"measured on {calibration.device_name} ({calibration.source})"
    if device.type != "cuda":
        return DEFAULT_MIN_FEATURES, f"the default on {device.type} (no GPU to calibrate for)"
    name = torch.cuda.get_device_name(device)
    calibration = shipped(name, fused_casts, directory)
    if calibration is None:
        return DEFAULT_MIN_FEATURES, (f"the default: no calibration for {name}; run bench/gpu_suite.py --sections "
                                      "fp8_linear and pass --fp8-calibration with its file")
    return calibration.threshold(recipe), f"measured on {name} ({calibration.source})"
