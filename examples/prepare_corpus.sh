#!/bin/bash
# Tokenizer + Megatron .bin/.idx datasets from a corpus directory of {train,valid,test}.jsonl
# (default: the bundled corpus, data/corpus) into DATA_DIR (default data/processed).
#   VOCAB_SIZE (default 8000)  WORKERS (default 2)  DATA_DIR (default data/processed)
#   CORPUS_DIR (default data/corpus; the tokenizer is trained on its train.jsonl)
set -euo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CORPUS_DIR=${CORPUS_DIR:-$REPO_DIR/data/corpus}
DATA_DIR=${DATA_DIR:-$REPO_DIR/data/processed}
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
