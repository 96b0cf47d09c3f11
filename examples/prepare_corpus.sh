#!/bin/bash
# Tokenizer + Megatron .bin/.idx datasets from the bundled corpus (data/corpus), into data/processed.
#   VOCAB_SIZE (default 8000)  WORKERS (default 2)  DATA_DIR (default data/processed)
set -euo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=${DATA_DIR:-$REPO_DIR/data/processed}
mkdir -p "$DATA_DIR"
if [ ! -f "$DATA_DIR/spm.model" ]; then
  python "$REPO_DIR/tools/train_tokenizer.py" --input "$REPO_DIR/data/corpus/train.jsonl" \
    --model-prefix "$DATA_DIR/spm" --model-type bpe --vocab-size "${VOCAB_SIZE:-8000}"
fi
for split in train valid test; do
  if [ ! -f "$DATA_DIR/corpus_${split}_text_document.idx" ]; then
    python "$REPO_DIR/tools/preprocess_data.py" --input "$REPO_DIR/data/corpus/$split.jsonl" \
      --output-prefix "$DATA_DIR/corpus_$split" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$DATA_DIR/spm.model" --append-eod --workers "${WORKERS:-2}"
  fi
done
echo "datasets in $DATA_DIR"
