#!/usr/bin/env bash
# Train on one machine: torchrun --standalone, one process per GPU (or NPROC_PER_NODE CPU
# processes). Every argument is passed to `python -m stage_dist.train`:
#
#   launch/single_node.sh --train-store data/train.zarr --val-store data/val.zarr \
#       --val-groundtruth ava_val_v2.2.csv --labelmap ava_action_list_v2.2.pbtxt --output-dir runs/stage
#
# Environment variables (see launch/common.sh):
#   NPROC_PER_NODE  processes, one per GPU (default: the GPUs visible; 1 without GPUs)
#   MAX_RESTARTS    restarts after a worker failure, resuming from the newest checkpoint (default 0)
#   MODULE          module to run (default stage_dist.train; e.g. stage_dist.infer)
#   PYTHON          interpreter with stage_dist installed (default python3)
#   TORCHRUN        launcher command (default "$PYTHON -m torch.distributed.run")
#   OMP_NUM_THREADS threads per process (torchrun sets 1 if unset and NPROC_PER_NODE > 1)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

set -x
exec "${TORCHRUN_CMD[@]}" --standalone \
    --nproc-per-node="$NPROC_PER_NODE" \
    --max-restarts="$MAX_RESTARTS" \
    -m "$MODULE" "$@"
