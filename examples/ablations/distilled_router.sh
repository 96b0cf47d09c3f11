#!/bin/bash
# Paper Table 6, distilled router: StableMoE distilling its routing into a word embedding (the paper's
# choice), a causal CNN or a 1-layer causal Transformer over the token ids; stage 1 is 25% of training
# for all of them, as in the paper's comparison (15K of 60K steps). The paper's 2- and 3-layer
# Transformer routers need a router-depth flag the trainer does not have (the 1-layer one is built).
# Calls examples/pretrain_stablemoe.sh.
#   DISTILL_ROUTER=wordemb|cnn|transformer (default wordemb)  DISTILL_LAYERS=1..3  STAGE1_FRACTION (default 0.25)  SIZE=tiny|base|large
set -euo pipefail
DISTILL_ROUTER=${DISTILL_ROUTER:-wordemb}
case "$DISTILL_ROUTER" in
  wordemb | cnn | transformer) ;;
  *) echo "distilled_router.sh: DISTILL_ROUTER must be wordemb, cnn or transformer (got $DISTILL_ROUTER)" >&2; exit 2 ;;
esac
export DISTILL_ROUTER
export STAGE1_FRACTION=${STAGE1_FRACTION:-0.25}
export RUN_NAME=${RUN_NAME:-ablation-distill-$DISTILL_ROUTER-${SIZE:-tiny}}
exec bash "$(dirname "${BASH_SOURCE[0]}")/../pretrain_stablemoe.sh" "$@"
