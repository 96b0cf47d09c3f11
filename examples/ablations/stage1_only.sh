#!/bin/bash
# Paper Table 5, "StableMoE with only stage 1": StableMoE's stage-1 routing (greedy over the learned
# centroids, sigmoid gate, balance loss) for the whole run; the distilled router is trained but never
# takes over, and evaluation uses the backbone routing. examples/pretrain_stablemoe.sh always passes a
# switch iteration, so this script builds the same StableMoE arguments without it (the trainer's way
# of saying "never"), on top of examples/common.sh.
#   SIZE=tiny|base|large  DISTILL_ROUTER=wordemb|cnn|transformer  (+ examples/common.sh's variables)
set -euo pipefail
export RUN_NAME=${RUN_NAME:-ablation-stage1-only-${SIZE:-tiny}}
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
MOE_ARGS=(--moe-router stablemoe --moe-layer-positions "${POSITIONS:-middle}" --moe-balance-loss-coeff 0.3
          --moe-distill-router "${DISTILL_ROUTER:-wordemb}" --moe-distill-dim 50)
run_training "${MOE_ARGS[@]}" "$@"
