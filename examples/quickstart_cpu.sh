#!/bin/bash
# The README's quick start: bundled corpus -> tokenizer + .bin/.idx -> a small StableMoE model trained
# through both stages on 2 CPU processes (expert parallel 2) -> validation and test perplexity ->
# the routing report of the run (fluctuation, expert load, distillation agreement, tokens per expert).
#   RUN_NAME (default quickstart) / RUN_DIR (default runs/$RUN_NAME-tiny): where the run goes; the
#     report is written to RUN_DIR/routing_report/
#   PROBE_INTERVAL (default 20) / PROBE_TOKENS (default 2048): the routing probe, a forward over
#     PROBE_TOKENS held-out tokens every PROBE_INTERVAL iterations (about 2% of the training time)
# Extra arguments go to the trainer (the last value of a flag wins).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN_DIR=${RUN_DIR:-$(dirname "$HERE")/runs/${RUN_NAME:-quickstart}-tiny}
bash "$HERE/prepare_corpus.sh"
SIZE=tiny RUN_DIR="$RUN_DIR" bash "$HERE/pretrain_stablemoe.sh" \
  --routing-probe-interval "${PROBE_INTERVAL:-20}" --routing-probe-tokens "${PROBE_TOKENS:-2048}" "$@"
REPORT=(python -m stablemoe_megatron.cli.routing_report "$RUN_DIR")
if [ "${DRY_RUN:-0}" = 1 ]; then echo "${REPORT[@]}"; exit 0; fi
"${REPORT[@]}"
echo "routing report of $RUN_DIR: $RUN_DIR/routing_report/report.md (plots beside it)"
