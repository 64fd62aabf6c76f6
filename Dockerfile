# FP8-LM on NVIDIA's PyTorch image (NGC), which brings CUDA, NCCL, a CUDA build of PyTorch and
# Transformer Engine (`--fp8-backend te`). Build and use (README, "Training on a cluster"):
#
#   docker build -t fp8-lm .
#   docker run --rm fp8-lm make test                          # the test suite, on the CPU
#   docker run --rm --gpus all --ipc=host fp8-lm torchrun --nproc-per-node 8 pretrain_gpt.py ...
#
# Another NGC release: --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 (PyTorch 2.6+).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/fp8-lm

# The image's PyTorch and Transformer Engine stay as NVIDIA built them: the project's other
# dependencies (and the test extra's) come from pyproject.toml without torch, and the project
# itself installs with --no-deps, so pip never swaps in a PyPI wheel of either.
COPY pyproject.toml README.md ./
RUN python -c "import importlib.metadata as m; print('torch', m.version('torch'), '| transformer_engine', m.version('transformer_engine'))" \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['test']; print('\n'.join(d for d in deps if not d.startswith(('torch', 'transformer-engine'))))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
# `make test` and `make pretrain` use .venv: here one that sees the image's packages, marked as
# installed so that make does not reinstall PyTorch.
RUN python -m venv --system-site-packages .venv \
    && .venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && touch .venv/.installed \
    && .venv/bin/python -c "import torch, fp8, megatron.training.training; print('fp8-lm on torch', torch.__version__)"

ENV PATH=/workspace/fp8-lm/.venv/bin:${PATH}
CMD ["bash"]
