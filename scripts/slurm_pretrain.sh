#!/bin/bash
# Pretraining under SLURM: one task per node, torchrun starts the GPU processes of its node.
#
#   CONFIG=configs/gpt-7b.yaml sbatch --nodes 4 scripts/slurm_pretrain.sh \
#       --data-path /data/corpus_text_document --tokenizer-type SentencePieceTokenizer \
#       --tokenizer-model /data/tokenizer.model
#
# Every argument after the script goes to pretrain_gpt.py (flags override the config file).
# Checkpoints go to $RUN_DIR/checkpoints and the run resumes from them, so the same command
# continues a job across allocations: the run saves and exits cleanly when
# --exit-duration-in-mins (EXIT_MINUTES, default: the time limit less 10 minutes) has passed.
# The SIGTERM that --signal below asks SLURM to send 5 minutes before the limit requests a save
# too, but torchrun allows its workers only ~30 s after a signal: rely on the exit duration.
#SBATCH --job-name=fp8-lm
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:?set CONFIG to a file under configs/, e.g. CONFIG=configs/gpt-7b.yaml}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [[ -z "${EXIT_MINUTES:-}" ]]; then
    # squeue's time limit as D-HH:MM:SS, HH:MM:SS or MM:SS; "UNLIMITED" means no limit
    limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null || echo UNLIMITED)
    if [[ "$limit" =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]]; then
        EXIT_MINUTES=$(( ${BASH_REMATCH[2]:-0} * 1440 + 10#${BASH_REMATCH[4]:-0} * 60 + 10#${BASH_REMATCH[5]} - 10 ))
    fi
fi
EXIT_FLAGS=()
if [[ -n "${EXIT_MINUTES:-}" && "${EXIT_MINUTES}" -gt 0 ]]; then
    EXIT_FLAGS=(--exit-duration-in-mins "$EXIT_MINUTES")
fi

# sed reads every line: `head` would close the pipe early, and pipefail would stop on the SIGPIPE
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
mkdir -p "$RUN_DIR"
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" \
    pretrain_gpt.py --config "$CONFIG" --device cuda \
    --save "$RUN_DIR/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}" --load "$RUN_DIR/checkpoints" \
    --metrics-file "$RUN_DIR/metrics.jsonl" \
    "${EXIT_FLAGS[@]}" "$@"
