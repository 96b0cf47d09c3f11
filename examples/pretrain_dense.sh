#!/bin/bash
# Dense baseline: the same Transformer without an MoE layer (paper Table 2, "Standard Transformer").
#   SIZE=tiny|base|large
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
if [ "$TP" -gt 1 ]; then PARALLEL_ARGS+=(--sequence-parallel); fi
run_training "$@"
