#!/bin/bash
# StableMoE (Dai et al., 2022): stage 1 learns a balanced routing and distils it into a word-embedding
# router; at 10% of training the distilled router is frozen and routes for the rest (stage 2).
#   SIZE=tiny|base|large  STAGE1_FRACTION=0.1 (none = stage 1 only)
#   DISTILL_ROUTER=wordemb|cnn|transformer  DISTILL_LAYERS=1..3 (cnn/transformer depth, paper Table 6)
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
read -r -a STAGE2_ARGS <<< "$(stage2_start_args "${STAGE1_FRACTION:-0.1}")"
MOE_ARGS=(--moe-router stablemoe --moe-layer-positions "${POSITIONS:-middle}" --moe-balance-loss-coeff 0.3
          --moe-distill-router "${DISTILL_ROUTER:-wordemb}" --moe-distill-dim 50
          --moe-distill-layers "${DISTILL_LAYERS:-1}" "${STAGE2_ARGS[@]}")
run_training "${MOE_ARGS[@]}" "$@"
