# Set-up and test entry points. `make test` builds .venv on first use and reuses it while
# pyproject.toml and this file are unchanged.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

# A CPU build of torch where there is no GPU; on a GPU machine any torch >= 2.6 that is present
# or installable. Override with `make test TORCH_SPEC=...` (and TORCH_INDEX_URL=... to take the
# wheel from another index, e.g. a CPU-only one).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.6
else
TORCH_SPEC ?= torch==2.13.0
endif
TORCH_INDEX_URL ?=
PIP_TORCH_OPTS := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)

PYTEST_ARGS ?=

.PHONY: test install clean-venv bench

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(0 if tuple(int(v) for v in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 6) else 1)" 2>/dev/null \
		|| $(PIP) install -q $(PIP_TORCH_OPTS) "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) bench/fp8_ops.py

clean-venv:
	rm -rf $(VENV)

# The built-in demo: a tiny GPT trained on CPU with 2 processes (tensor parallel 2 + sequence
# parallel) at FP8 level O3 (FP8 weights, FP8 sequence-parallel all-gathers); ends with a
# loss-curve PNG. PRETRAIN_LEVEL=none (or O0 / O1 / O2) runs the same demo at another level.
PRETRAIN_LEVEL ?= O3
PRETRAIN_DIR ?= runs/pretrain-demo
PRETRAIN_ARGS ?=

.PHONY: pretrain corpus
corpus: $(STAMP)
	$(PY) tools/builtin_corpus.py

pretrain: $(STAMP)
	$(PY) tools/builtin_corpus.py
	@mkdir -p $(PRETRAIN_DIR)
	rm -f $(PRETRAIN_DIR)/metrics.jsonl
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 pretrain_gpt.py --config configs/gpt-tiny.yaml \
		$$($(PY) tools/builtin_corpus.py --print-args --quiet) \
		--tensor-model-parallel-size 2 --sequence-parallel --fp8-level $(PRETRAIN_LEVEL) --device cpu \
		--metrics-file $(PRETRAIN_DIR)/metrics.jsonl --loss-plot $(PRETRAIN_DIR)/loss.png \
		--save $(PRETRAIN_DIR)/checkpoints $(PRETRAIN_ARGS)

# Supervised fine-tuning demo: the pretraining demo's checkpoint (made first when missing) learns
# the built-in instruction set (tools/builtin_sft.py: questions about the standard library with
# checkable answers) at FP8 level O3, 2 processes, tensor parallel 2 + sequence parallel; exact
# match on held-out questions before and after, validation response loss, and a loss plot.
SFT_LEVEL ?= O3
SFT_DIR ?= runs/sft-demo
SFT_ARGS ?=
SFT_EVAL := $(PY) tools/sft_eval.py --input data/builtin-sft/test.jsonl --max-samples 150 --device cpu

.PHONY: sft
sft: $(STAMP)
	@test -f $(PRETRAIN_DIR)/checkpoints/latest_checkpointed_iteration.txt || $(MAKE) pretrain
	$(PY) tools/builtin_sft.py
	@mkdir -p $(SFT_DIR)
	rm -rf $(SFT_DIR)/checkpoints $(SFT_DIR)/metrics.jsonl
	$(SFT_EVAL) --load $(PRETRAIN_DIR)/checkpoints --out $(SFT_DIR)/eval-before.json
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 finetune_sft.py --config configs/gpt-tiny.yaml \
		$$($(PY) tools/builtin_sft.py --print-args --quiet) --pretrained-checkpoint $(PRETRAIN_DIR)/checkpoints \
		--tensor-model-parallel-size 2 --sequence-parallel --fp8-level $(SFT_LEVEL) --device cpu \
		--train-iters 300 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 --eval-interval 50 --eval-iters 4 \
		--metrics-file $(SFT_DIR)/metrics.jsonl --loss-plot $(SFT_DIR)/loss.png --save $(SFT_DIR)/checkpoints $(SFT_ARGS)
	$(SFT_EVAL) --load $(SFT_DIR)/checkpoints --out $(SFT_DIR)/eval-after.json
