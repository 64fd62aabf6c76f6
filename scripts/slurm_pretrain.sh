#!/bin/bash
# Pretraining under SLURM: one task per node; torchrun (scripts/torchrun_graceful.py) starts the
# node's processes, one per GPU, or NPROC_PER_NODE on CPU.
#
#   CONFIG=configs/gpt-7b.yaml sbatch --nodes 4 --gpus-per-node 8 --time 24:00:00 \
#       scripts/slurm_pretrain.sh --data-path /data/corpus_text_document \
#       --tokenizer-type SentencePieceTokenizer --tokenizer-model /data/tokenizer.model
#
# Every argument after the script goes to pretrain_gpt.py (flags override the config file).
# Submit from any folder: CONFIG, RUN_DIR and the data paths may be relative to it; CONFIG is
# also looked up in the repository. Resources are sbatch's (`--gpus-per-node`, or
# SBATCH_GPUS_PER_NODE in the environment): the script asks for no GPUs itself, so it runs on
# clusters that declare none. The device follows what the job sees: `cuda` with one process per
# visible GPU, else `cpu` (DEVICE and NPROC_PER_NODE override). The project's Python is
# .venv/bin/python in the repository when there is one, else `python3` (PYTHON overrides); the
# repository is where this script was submitted from (FP8LM_HOME overrides).
#
# Checkpoints go to $RUN_DIR/checkpoints (default: runs/<config name> in the repository) and the
# run resumes from them, so the same command continues a job across allocations. Two ways out:
# --exit-duration-in-mins (EXIT_MINUTES, default: the time limit less 10 minutes) and the SIGTERM
# that --signal below asks SLURM to send 5 minutes before the limit (also `scancel --signal TERM`,
# or a plain `scancel`): the run saves at its next iteration boundary and exits 0, so the job ends
# COMPLETED and `--dependency afterok:` chains go on. A SIGTERM during start-up is kept until the
# first iteration, then saved at. A SIGTERM to this batch shell (`--signal B:TERM@...`) is passed
# on to the job step.
#SBATCH --job-name=fp8-lm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 2
}

repo_root() {
    # Under sbatch this file is a copy in slurmd's spool folder; SLURM knows the original path
    # (the job's Command: the script's path, a space, then its arguments).
    local candidates=("${FP8LM_HOME:-}" "$(dirname "${BASH_SOURCE[0]}")/..")
    if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null; then
        local command
        command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | sed -n 1p || true)
        [[ $# -gt 0 ]] && command=${command%" $*"}
        [[ -f "$command" ]] || command=${command%% *}
        [[ -n "$command" ]] && candidates+=("$(dirname "$command")/..")
    fi
    candidates+=("${SLURM_SUBMIT_DIR:-$PWD}")
    local dir
    for dir in "${candidates[@]}"; do
        if [[ -n "$dir" && -f "$dir/pretrain_gpt.py" ]]; then
            (cd "$dir" && pwd)
            return
        fi
    done
    return 1
}

gpus_visible() {
    # GPUs this job sees on its first node (the nodes are alike): SLURM's count, the visible
    # devices, or every GPU nvidia-smi lists where the cluster hands out whole nodes.
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]]; then
        awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}

node_address() {
    # The node's NodeAddr where SLURM has one (node names need not resolve), else its name.
    local addr
    addr=$(scontrol show node -o "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | sed -n 1p || true)
    echo "${addr:-$1}"
}

[[ -n "${CONFIG:-}" ]] || die "set CONFIG to a file under configs/, e.g. CONFIG=configs/gpt-7b.yaml"
REPO=$(repo_root "$@") || die "cannot find the repository (pretrain_gpt.py); set FP8LM_HOME to its folder"
if [[ ! -f "$CONFIG" ]]; then
    [[ -f "$REPO/$CONFIG" ]] || die "CONFIG=$CONFIG: no such file here or in $REPO"
    CONFIG="$REPO/$CONFIG"
fi
RUN_DIR=${RUN_DIR:-$REPO/runs/$(basename "$CONFIG" .yaml)}

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x "$REPO/.venv/bin/python" ]] && PYTHON="$REPO/.venv/bin/python"
fi
command -v "$PYTHON" >/dev/null || die "no Python at $PYTHON; set PYTHON to the project's interpreter"

GPUS=$(gpus_visible)
NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}
if [[ -z "$NPROC_PER_NODE" ]]; then
    NPROC_PER_NODE=$(( GPUS > 0 ? GPUS : 1 ))
fi
if [[ -z "${DEVICE:-}" ]]; then
    DEVICE=$([[ "$GPUS" -gt 0 ]] && echo cuda || echo cpu)
fi

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
RDZV_HOST=${RDZV_HOST:-$(node_address "$HEAD_NODE")}
RDZV_PORT=${RDZV_PORT:-29500}
mkdir -p "$RUN_DIR"
echo "slurm_pretrain.sh: $SLURM_NNODES node(s) x $NPROC_PER_NODE process(es) on $DEVICE;" \
     "repository $REPO; run folder $RUN_DIR; rendezvous $RDZV_HOST:$RDZV_PORT"

# A SIGTERM to this shell (plain scancel, `--signal B:TERM`) goes on to the step, and the shell
# waits for the step to save and exit instead of ending the job under it.
# shellcheck disable=SC2317  # (run by the trap)
on_term() {
    echo "slurm_pretrain.sh: SIGTERM; passing it to the job step" >&2
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
}
trap on_term TERM

srun --kill-on-bad-exit=1 "$PYTHON" "$REPO/scripts/torchrun_graceful.py" \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" \
    "$REPO/pretrain_gpt.py" --config "$CONFIG" --device "$DEVICE" \
    --save "$RUN_DIR/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}" --load "$RUN_DIR/checkpoints" \
    --metrics-file "$RUN_DIR/metrics.jsonl" \
    "${EXIT_FLAGS[@]}" "$@" &
step=$!
set +e
wait "$step"
status=$?
while kill -0 "$step" 2>/dev/null; do  # woken by the trap: the step is still saving
    wait "$step"
    status=$?
done
exit "$status"
