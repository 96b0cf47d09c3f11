#!/bin/bash
# Dense baseline: the same Transformer without an MoE layer (paper Table 2, "Standard Transformer").
#   SIZE=tiny|base|large
source "$(dirname "$0")/common.sh"
EP=1
PARALLEL_ARGS=(--tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP)
[ "$TP" -gt 1 ] && PARALLEL_ARGS+=(--sequence-parallel)
run_training "$@"
