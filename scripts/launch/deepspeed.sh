#!/usr/bin/env bash
# DeepSpeed's own launcher, one node or several (HOSTFILE, see hostfile.example):
#   scripts/launch/deepspeed.sh distributed=deepspeed distributed.zero_stage=2 run_dir=runs/zero2
#   HOSTFILE=scripts/launch/hostfile.example scripts/launch/deepspeed.sh distributed=deepspeed ... run_dir=/shared/x
set -euo pipefail
args=()
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${NUM_GPUS:-}" ]]; then args+=(--num_gpus "$NUM_GPUS"); fi
exec deepspeed "${args[@]}" --module llmstable.cli train "$@"
