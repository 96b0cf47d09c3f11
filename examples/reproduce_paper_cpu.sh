#!/bin/bash
# Small-scale reproduction of the paper's comparisons on the bundled corpus, on 2 CPU cores
# (about 45 minutes): tokenizer + datasets, then dense, Switch, BASE, Hash, Expert Choice (c = 1),
# StableMoE, StableMoE stage 1 only and BASE + distil-and-freeze at equal compute (same tokens,
# steps and backbone; top-1 MoE variants have equal active FLOPs), each with the routing probe;
# then the table (valid / test perplexity, tokens/s, routing fluctuation after 20/50/80 % of
# training) and the plots. Results in runs/reproduce/results.md and runs/reproduce/report/.
#   OUTPUT=runs/reproduce  NPROC=2  TRAIN_ITERS=300   extra arguments go to tools/reproduce.py
#   (e.g. --variants stablemoe switch, --fresh, --report-only)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HERE/.." && pwd)
bash "$HERE/prepare_corpus.sh"
python "$REPO_DIR/tools/reproduce.py" --output "${OUTPUT:-$REPO_DIR/runs/reproduce}" --nproc "${NPROC:-2}" \
  --train-iters "${TRAIN_ITERS:-300}" "$@"
