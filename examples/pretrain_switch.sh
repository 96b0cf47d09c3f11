#!/bin/bash
# Switch Transformer baseline: top-1 softmax routing with the load-balancing loss (paper Table 1).
#   SIZE=tiny|base|large
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
MOE_ARGS=(--moe-router switch --moe-layer-positions "${POSITIONS:-middle}" --moe-aux-loss-coeff 0.01)
run_training "${MOE_ARGS[@]}" "$@"
