#!/bin/bash
# Tokenizer + Megatron .bin/.idx datasets from the large Debian-documentation corpus
# (data/large_corpus, built by `python tools/build_large_corpus.py --download`, see
# data/LARGE_CORPUS.md) into data/large_processed, with the file names the reproduction driver
# expects (corpus_{train,valid,test}_text_document, spm.model).
#   VOCAB_SIZE (default 8000: the tiny model's)  WORKERS (default 2)  DATA_DIR (default data/large_processed)
#   CORPUS_DIR (default data/large_corpus)
set -euo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CORPUS_DIR=${CORPUS_DIR:-$REPO_DIR/data/large_corpus}
DATA_DIR=${DATA_DIR:-$REPO_DIR/data/large_processed}
if [ ! -f "$CORPUS_DIR/train.jsonl" ]; then
  echo "prepare_large_corpus: $CORPUS_DIR/train.jsonl not found: run python tools/build_large_corpus.py --download first" >&2
  exit 2
fi
mkdir -p "$DATA_DIR"
if [ ! -f "$DATA_DIR/spm.model" ]; then
  python "$REPO_DIR/tools/train_tokenizer.py" --input "$CORPUS_DIR/train.jsonl" \
    --model-prefix "$DATA_DIR/spm" --model-type bpe --vocab-size "${VOCAB_SIZE:-8000}"
fi
for split in train valid test; do
  if [ ! -f "$DATA_DIR/corpus_${split}_text_document.idx" ]; then
    python "$REPO_DIR/tools/preprocess_data.py" --input "$CORPUS_DIR/$split.jsonl" \
      --output-prefix "$DATA_DIR/corpus_$split" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$DATA_DIR/spm.model" --append-eod --workers "${WORKERS:-2}"
  fi
done
echo "datasets in $DATA_DIR"
