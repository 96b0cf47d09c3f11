#!/bin/bash
# Paper Table 4, position of the MoE layer: StableMoE with its stacked expert sublayers after block L/2
# (middle, the paper's choice), before block 1 (bottom), after block L (top), or scattered (one
# sublayer after each of blocks L/4, 2L/4, 3L/4). Calls examples/pretrain_stablemoe.sh.
#   POSITION=middle|top|bottom|scattered (default middle)  SIZE=tiny|base|large  (+ examples/common.sh's variables)
#   for p in middle top bottom scattered; do POSITION=$p SIZE=base bash examples/ablations/moe_position.sh; done
set -euo pipefail
POSITION=${POSITION:-middle}
case "$POSITION" in
  middle | top | bottom | scattered) ;;
  *) echo "moe_position.sh: POSITION must be middle, top, bottom or scattered (got $POSITION)" >&2; exit 2 ;;
esac
export POSITIONS=$POSITION
export RUN_NAME=${RUN_NAME:-ablation-position-$POSITION-${SIZE:-tiny}}
exec bash "$(dirname "${BASH_SOURCE[0]}")/../pretrain_stablemoe.sh" "$@"
