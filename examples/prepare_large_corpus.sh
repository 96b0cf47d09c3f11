#!/bin/bash
# Tokenizer + Megatron .bin/.idx datasets from the large Debian-documentation corpus
# (data/large_corpus, built by `python tools/build_large_corpus.py --download`, see
# data/LARGE_CORPUS.md) into data/large_processed, with the file names the reproduction driver
# expects (corpus_{train,valid,test}_text_document, spm.model): prepare_corpus.sh on that corpus.
#   VOCAB_SIZE (default 8000: the tiny model's)  WORKERS (default 2)  DATA_DIR (default data/large_processed)
#   CORPUS_DIR (default data/large_corpus)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HERE/.." && pwd)
export CORPUS_DIR=${CORPUS_DIR:-$REPO_DIR/data/large_corpus}
export DATA_DIR=${DATA_DIR:-$REPO_DIR/data/large_processed}
if [ ! -f "$CORPUS_DIR/train.jsonl" ]; then
  echo "prepare_large_corpus: $CORPUS_DIR/train.jsonl not found: run python tools/build_large_corpus.py --download first" >&2
  exit 2
fi
exec bash "$HERE/prepare_corpus.sh"
