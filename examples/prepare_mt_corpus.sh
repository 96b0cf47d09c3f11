#!/bin/bash
# Tokenizer + Megatron .bin/.idx parallel-text datasets from a translation corpus directory of
# {train,valid,test}.jsonl records {"lang", "src", "tgt"} (default: the bundled data/mt, built by
# tools/build_mt_corpus.py from Debian's gettext catalogues) into DATA_DIR (default data/mt_processed).
# One SentencePiece model over both sides; the language tags <fr> ... <tr> are one piece each.
# Writes DATA_DIR/{train,valid,test}_{src,tgt}_document.{bin,idx}: pass --data-path DATA_DIR/train.
#   VOCAB_SIZE (default 2000: the bundled corpus is 44.5k short pairs)  WORKERS (default 2)  DATA_DIR  CORPUS_DIR (default data/mt)
set -euo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CORPUS_DIR=${CORPUS_DIR:-$REPO_DIR/data/mt}
DATA_DIR=${DATA_DIR:-$REPO_DIR/data/mt_processed}
TAGS=("<fr>" "<cs>" "<de>" "<fi>" "<lv>" "<et>" "<ro>" "<hi>" "<tr>")
mkdir -p "$DATA_DIR"
if [ ! -f "$DATA_DIR/spm.model" ]; then
  python "$REPO_DIR/tools/train_tokenizer.py" --input "$CORPUS_DIR/train.jsonl" --json-keys src tgt \
    --model-prefix "$DATA_DIR/spm" --model-type bpe --vocab-size "${VOCAB_SIZE:-2000}" \
    --user-defined-symbols "${TAGS[@]}"
fi
for split in train valid test; do
  if [ ! -f "$DATA_DIR/${split}_tgt_document.idx" ]; then
    python "$REPO_DIR/tools/preprocess_data.py" --input "$CORPUS_DIR/$split.jsonl" --json-keys src tgt \
      --output-prefix "$DATA_DIR/$split" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$DATA_DIR/spm.model" --workers "${WORKERS:-2}"
  fi
done
echo "parallel-text datasets in $DATA_DIR (--data-path $DATA_DIR/train)"
