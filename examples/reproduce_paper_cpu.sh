#!/bin/bash
# The paper's comparisons at CPU scale, over seeds, on the large Debian-documentation corpus
# (about 21 M tokens, so no run repeats data): builds the corpus (apt-get download of 72 Debian
# documentation packages, see data/LARGE_CORPUS.md) and its tokenizer/datasets, then runs
# tools/reproduce.py: every variant (StableMoE with the stage switch at 10/25/50 %, StableMoE stage 1
# only, dense, the equal-FLOPs dense-ffn, Hash, Switch, BASE, Expert Choice, BASE + distil-and-freeze)
# for seeds 1 2 3, with the authors' recipe. Results: $OUTPUT/results.md, results.json, report/*.png.
# About 4-6 minutes per run on 2 cores (33 runs by default); interrupted, it resumes where it stopped
# (finished runs are kept, an interrupted run continues from its last checkpoint).
#   OUTPUT=runs/reproduce  NPROC=2  TRAIN_ITERS=300   extra arguments go to tools/reproduce.py
#   (e.g. --variants stablemoe hash --seeds 1 2 3; the stage-1 study: --variants stablemoe-stage1
#   s1-previous dense-previous s1-alpha0 ...; --report-only; --fresh)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HERE/.." && pwd)
if [ ! -f "$REPO_DIR/data/large_corpus/train.jsonl" ]; then
  python "$REPO_DIR/tools/build_large_corpus.py" --download
fi
bash "$HERE/prepare_large_corpus.sh"
python "$REPO_DIR/tools/reproduce.py" --output "${OUTPUT:-$REPO_DIR/runs/reproduce}" --nproc "${NPROC:-2}" \
  --train-iters "${TRAIN_ITERS:-300}" --data-dir "$REPO_DIR/data/large_processed" "$@"
