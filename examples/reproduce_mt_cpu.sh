#!/bin/bash
# The paper's translation comparison (Table 3) at CPU scale, over seeds, on the bundled X->En corpus
# (data/mt, 9 languages): prepares the tokenizer and datasets, then runs tools/reproduce_mt.py: dense,
# the equal-FLOPs dense-ffn, Switch, BASE, Hash and StableMoE for seeds 1 2 3 (configs/mt_tiny.yaml,
# 2 processes, EP 2), each translating the test set greedily, scored with BLEU and chrF per language.
# Results: $OUTPUT/results.md, results.json, fluctuation.png. About 4 minutes per run on 2 cores;
# interrupted, it resumes where it stopped.
#   OUTPUT=runs/reproduce_mt  NPROC=2  TRAIN_ITERS=400   extra arguments go to tools/reproduce_mt.py
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HERE/.." && pwd)
bash "$HERE/prepare_mt_corpus.sh"
python "$REPO_DIR/tools/reproduce_mt.py" --output "${OUTPUT:-$REPO_DIR/runs/reproduce_mt}" --nproc "${NPROC:-2}" \
  --train-iters "${TRAIN_ITERS:-400}" "$@"
