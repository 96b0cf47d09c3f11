#!/bin/bash
# Paper Table 6, length of training stage 1: StableMoE switching to the frozen distilled router after
# 10% (the paper's choice, 6K of 60K steps), 25% (15K) or 50% (30K) of training.
# Calls examples/pretrain_stablemoe.sh.
#   STAGE1=10|25|50 (percent, default 10)  DISTILL_ROUTER=wordemb|cnn|transformer  SIZE=tiny|base|large
set -euo pipefail
STAGE1=${STAGE1:-10}
case "$STAGE1" in
  10 | 25 | 50) ;;
  *) echo "stage1_length.sh: STAGE1 must be 10, 25 or 50 (percent of training; got $STAGE1)" >&2; exit 2 ;;
esac
export STAGE1_FRACTION=0.$STAGE1
export RUN_NAME=${RUN_NAME:-ablation-stage1-$STAGE1-${DISTILL_ROUTER:-wordemb}-${SIZE:-tiny}}
exec bash "$(dirname "${BASH_SOURCE[0]}")/../pretrain_stablemoe.sh" "$@"
