#!/bin/bash
# Paper Table 5, "BASE Layer + fixed routing strategy": BASE layer routing distilled into a word-embedding
# router during the first 10% of training (6K of 60K steps), which is then frozen and routes for the
# rest (distil-and-freeze composes with any learned top-1 router). The plain BASE layer it is compared
# with is examples/pretrain_base.sh. Calls examples/pretrain_base.sh with DISTILL=1.
#   SIZE=tiny|base|large  (+ examples/common.sh's variables)
set -euo pipefail
export DISTILL=1
export RUN_NAME=${RUN_NAME:-ablation-base-distill-freeze-${SIZE:-tiny}}
exec bash "$(dirname "${BASH_SOURCE[0]}")/../pretrain_base.sh" "$@"
