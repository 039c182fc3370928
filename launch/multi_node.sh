#!/usr/bin/env bash
# Train on several machines: run this script once on every node; torchrun's c10d rendezvous
# (hosted by the node at MASTER_ADDR:MASTER_PORT) forms one job of NNODES x NPROC_PER_NODE
# ranks. Every argument is passed to `python -m stage_dist.train` (the same on every node; the
# data paths must be readable from every node, e.g. a shared file system):
#
#   # on node 0 (address 10.0.0.1) and, with NODE_RANK=1, on node 1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh --train-store ... --output-dir runs/stage
#
# Environment variables:
#   NNODES          number of nodes, or MIN:MAX for an elastic job (required)
#   NODE_RANK       this node's rank 0..NNODES-1 (default: $SLURM_NODEID, else 0); with c10d the
#                   global ranks are assigned at rendezvous, so it only labels this node
#   MASTER_ADDR     host name or address of the rendezvous node (required), reachable from all
#   MASTER_PORT     rendezvous port on MASTER_ADDR (default 29500)
#   RDZV_ID         job id, the same on all nodes (default: $SLURM_JOB_ID, else stage_dist)
#   NPROC_PER_NODE  processes per node, one per GPU (default: the GPUs visible; 1 without GPUs)
#   MAX_RESTARTS    restarts after a worker failure, resuming from the newest checkpoint (default 0)
#   MODULE          module to run (default stage_dist.train; e.g. stage_dist.infer)
#   PYTHON          interpreter with stage_dist installed (default python3)
#   TORCHRUN        launcher command (default "$PYTHON -m torch.distributed.run")
#   OMP_NUM_THREADS threads per process (torchrun sets 1 if unset and NPROC_PER_NODE > 1)
# NCCL's own variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) pass through to the workers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the rendezvous node (node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-stage_dist}}"
if ! [[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
    echo "error: NNODES must be N or MIN:MAX, got '$NNODES'" >&2
    exit 2
fi
require_positive_int MASTER_PORT "$MASTER_PORT"
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]]; then
    echo "error: NODE_RANK must be a non-negative integer, got '$NODE_RANK'" >&2
    exit 2
fi

set -x
exec "${TORCHRUN_CMD[@]}" \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --node-rank="$NODE_RANK" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$RDZV_ID" \
    --max-restarts="$MAX_RESTARTS" \
    -m "$MODULE" "$@"
