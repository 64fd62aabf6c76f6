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

# RLHF demo, from the SFT demo's model (made first when missing):
# - GRPO on the built-in module questions (tools/builtin_rlhf.py: "Which module does `json.dumps`
#   come from?", reward 1 for the exact answer, rlhf.rewards:builtin_exact_match), 2 processes
#   (data parallel), at FP8 level O3 and, for comparison, at none; the sampled exact match on the
#   held-out module questions before and after each, and a plot of the reward per iteration;
# - DPO on the built-in preference pairs at O3 (tensor parallel 2 + sequence parallel, reference
#   with FP8 weights): chosen-over-rejected accuracy on the held-out pairs.
# RLHF_LEVELS=O3 skips the comparison run.
RLHF_DIR ?= runs/rlhf-demo
RLHF_LEVELS ?= O3 none
RLHF_ARGS ?=
RLHF_EVAL := $(PY) tools/sft_eval.py --input data/builtin-rlhf/module-prompts-test.jsonl --response-key answer \
	--samples-per-prompt 4 --temperature 0.7 --device cpu
GRPO_FLAGS := --config configs/gpt-tiny.yaml --pretrained-checkpoint $(SFT_DIR)/checkpoints \
	--reward-fn rlhf.rewards:builtin_exact_match --rollout-prompts 16 --group-size 8 --temperature 0.7 \
	--max-new-tokens 10 --global-batch-size 64 --micro-batch-size 32 --ppo-epochs 2 --train-iters 40 \
	--lr 2e-4 --min-lr 2e-5 --lr-warmup-iters 0 --log-interval 1 --device cpu

.PHONY: rlhf
rlhf: $(STAMP)
	@test -f $(SFT_DIR)/checkpoints/latest_checkpointed_iteration.txt || $(MAKE) sft
	$(PY) tools/builtin_rlhf.py --quiet > /dev/null
	@mkdir -p $(RLHF_DIR)
	rm -rf $(RLHF_DIR)/grpo-* $(RLHF_DIR)/dpo-O3 $(RLHF_DIR)/*.json $(RLHF_DIR)/*.png
	$(RLHF_EVAL) --load $(SFT_DIR)/checkpoints --out $(RLHF_DIR)/eval-sft.json
	for level in $(RLHF_LEVELS); do \
		$(VENV)/bin/torchrun --standalone --nproc-per-node 2 rlhf/train_grpo.py $(GRPO_FLAGS) \
			$$($(PY) tools/builtin_rlhf.py --print-rl-args --quiet) --fp8-level $$level --reference-fp8-level $$level \
			--save $(RLHF_DIR)/grpo-$$level/checkpoints --metrics-file $(RLHF_DIR)/grpo-$$level/metrics.jsonl $(RLHF_ARGS) \
		&& $(RLHF_EVAL) --load $(RLHF_DIR)/grpo-$$level/checkpoints --out $(RLHF_DIR)/eval-grpo-$$level.json || exit 1; \
	done
	$(PY) tools/plot_metrics.py --key rlhf.reward --out $(RLHF_DIR)/grpo-reward.png \
		$(foreach level,$(RLHF_LEVELS),$(RLHF_DIR)/grpo-$(level)/metrics.jsonl) --labels $(RLHF_LEVELS)
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 rlhf/train_dpo.py --config configs/gpt-tiny.yaml \
		$$($(PY) tools/builtin_rlhf.py --print-args --quiet) --pretrained-checkpoint $(SFT_DIR)/checkpoints \
		--tensor-model-parallel-size 2 --sequence-parallel --fp8-level O3 --reference-fp8-level O3 --device cpu \
		--train-iters 40 --lr 2e-4 --min-lr 2e-5 --lr-warmup-iters 4 --eval-interval 20 --eval-iters 4 \
		--metrics-file $(RLHF_DIR)/dpo-O3/metrics.jsonl --save $(RLHF_DIR)/dpo-O3/checkpoints \
		--eval-out $(RLHF_DIR)/eval-dpo-O3.json
	$(PY) tools/rlhf_summary.py $(RLHF_DIR)
