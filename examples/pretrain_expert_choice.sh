#!/bin/bash
# Expert Choice routing (Zhou et al., 2022): each expert takes its top-k tokens, k = T*c/N.
# Training looks ahead within the batch; evaluation uses causal threshold routing.
#   SIZE=tiny|base|large  CAPACITY_FACTOR=2
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
MOE_ARGS=(--moe-router expert-choice --moe-expert-capacity-factor "${CAPACITY_FACTOR:-2}"
          --moe-layer-positions "${POSITIONS:-middle}")
run_training "${MOE_ARGS[@]}" "$@"
