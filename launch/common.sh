# Sourced by single_node.sh and multi_node.sh: defaults shared by the launchers.
#
#   NPROC_PER_NODE  processes per node, one per GPU (default: the GPUs visible, from
#                   CUDA_VISIBLE_DEVICES or nvidia-smi; 1 on a machine without GPUs)
#   MAX_RESTARTS    times torchrun restarts the workers after a failure (default 0); a restarted
#                   run resumes from its newest checkpoint (the trainer's --resume auto)
#   MODULE          module to run (default stage_dist.train; stage_dist.infer also works)
#   PYTHON          interpreter with stage_dist installed (default python3)
#   TORCHRUN        launcher command, split on spaces (default "$PYTHON -m torch.distributed.run",
#                   which is torchrun)
#   OMP_NUM_THREADS threads per process; torchrun sets 1 when it is unset and
#                   NPROC_PER_NODE > 1
#   PET_SIGNALS_TO_HANDLE  signals torchrun forwards to its workers (default
#                   SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1: the trainer checkpoints and stops on
#                   SIGTERM and SIGUSR1, see --preempt-signals)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits for its workers after forwarding
#                   such a signal before it kills them (default 100, inside slurm.sbatch's 120)

visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local devices="${CUDA_VISIBLE_DEVICES//[[:space:]]/}"
        [[ -z "$devices" ]] && { echo 0; return; }
        awk -F, '{print NF}' <<<"$devices"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

require_positive_int() {  # name value
    if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $1 must be a positive integer, got '$2'" >&2
        exit 2
    fi
}

PYTHON="${PYTHON:-python3}"
MODULE="${MODULE:-stage_dist.train}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(visible_gpus)"
    (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
require_positive_int NPROC_PER_NODE "$NPROC_PER_NODE"
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    echo "error: MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'" >&2
    exit 2
fi
# torchrun with --signals-to-handle (torch 2.13 has it) reads it from PET_SIGNALS_TO_HANDLE; earlier ones read
# TORCHELASTIC_SIGNALS_TO_HANDLE where they support it at all (then SIGUSR1 is not forwarded).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-$PET_SIGNALS_TO_HANDLE}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"
read -r -a TORCHRUN_CMD <<<"${TORCHRUN:-$PYTHON -m torch.distributed.run}"
