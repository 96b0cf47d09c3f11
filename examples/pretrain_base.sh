#!/bin/bash
# BASE layer baseline: balanced linear assignment by auction in training, greedy at inference.
#   SIZE=tiny|base|large   DISTILL=1 adds distil-and-freeze at 10% (paper Table 5, "BASE + fixed routing")
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
MOE_ARGS=(--moe-router base --moe-layer-positions "${POSITIONS:-middle}")
if [ "${DISTILL:-0}" = 1 ]; then
  read -r -a STAGE2_ARGS <<< "$(stage2_start_args "${STAGE1_FRACTION:-0.1}")"
  MOE_ARGS+=(--moe-distill-router wordemb "${STAGE2_ARGS[@]}")
fi
run_training "${MOE_ARGS[@]}" "$@"
