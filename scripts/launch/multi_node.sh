#!/usr/bin/env bash
# Several machines, torchrun with c10d rendezvous. Run the same line on every node:
#   RDZV_HOST=10.0.0.1 NNODES=2 NPROC=8 RUN_ID=run350m scripts/launch/multi_node.sh \
#       distributed=fsdp2 model=llama_350m data=c4 run_dir=/shared/runs/350m
# RDZV_HOST: a private address of one node (the store listens on every interface of that node: firewall its
# port, see the README). run_dir must be on a filesystem every node sees (checkpoints are written by all ranks).
set -euo pipefail
: "${RDZV_HOST:?set RDZV_HOST to a private IP of one node}" "${NNODES:?set NNODES}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
RDZV_PORT=${RDZV_PORT:-29500}
RUN_ID=${RUN_ID:-llmstable}
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
    --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$RUN_ID" -m llmstable.cli train "$@"
