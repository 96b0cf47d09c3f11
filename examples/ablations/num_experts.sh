#!/bin/bash
# Paper Figure 5, number of experts: StableMoE, BASE layer or Hash layer with 16, 32 (the base
# setting) or 64 experts. Calls examples/pretrain_<ROUTER>.sh with EXPERTS set.
#   EXPERTS=16|32|64 (default 32)  ROUTER=stablemoe|base|hash (default stablemoe)  SIZE=tiny|base|large
#   for r in stablemoe base hash; do for n in 16 32 64; do ROUTER=$r EXPERTS=$n SIZE=base bash examples/ablations/num_experts.sh; done; done
set -euo pipefail
EXPERTS=${EXPERTS:-32}
ROUTER=${ROUTER:-stablemoe}
case "$EXPERTS" in
  16 | 32 | 64) ;;
  *) echo "num_experts.sh: EXPERTS must be 16, 32 or 64 (got $EXPERTS)" >&2; exit 2 ;;
esac
case "$ROUTER" in
  stablemoe | base | hash) ;;
  *) echo "num_experts.sh: ROUTER must be stablemoe, base or hash (got $ROUTER)" >&2; exit 2 ;;
esac
export EXPERTS
export RUN_NAME=${RUN_NAME:-ablation-experts-$EXPERTS-$ROUTER-${SIZE:-tiny}}
exec bash "$(dirname "${BASH_SOURCE[0]}")/../pretrain_$ROUTER.sh" "$@"
