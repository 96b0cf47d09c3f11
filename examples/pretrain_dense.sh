#!/bin/bash
# Dense baseline: the same Transformer without an MoE layer (paper Table 2, "Standard Transformer").
#   SIZE=tiny|base|large
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
# No MoE layer: the size file's settings except its moe section, as flags (a --num-experts that --config
# set cannot be unset by a flag); EXPERTS is not used.
DENSE_FLAGS=$(size_config flags "$CONFIG_FILE" --without moe)
mapfile -t CONFIG_ARGS <<< "$DENSE_FLAGS"
EXPERT_ARGS=()
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
if [ "$TP" -gt 1 ]; then PARALLEL_ARGS+=(--sequence-parallel); fi
run_training "$@"
