#!/usr/bin/env bash
# One machine, N processes (one per GPU, or N CPU processes over gloo):
#   scripts/launch/single_node.sh 8 distributed=fsdp2 model=llama_350m data=c4 run_dir=runs/350m
# --standalone runs torchrun's rendezvous on this machine only (see the README on binding it to a private
# interface); RUN_DIR must be the same for every rank, so it is required.
set -euo pipefail
nproc=${1:?usage: single_node.sh NPROC [overrides...] run_dir=PATH}; shift
exec torchrun --standalone --nproc_per_node "$nproc" -m llmstable.cli train "$@"
