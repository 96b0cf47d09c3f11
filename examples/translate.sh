#!/bin/bash
# Train a translation model on the bundled X->En corpus through both stages (StableMoE by default),
# then translate the test set and score BLEU / chrF per language (CPU: 2 processes, EP 2, minutes).
#   ROUTER=stablemoe|switch|base|hash|dense|dense-ffn (a variant of tools/reproduce_mt.py)
#   TRAIN_ITERS (default 400)  SEED (default 1)  NPROC (default 2)  BEAM (default 4)
#   RUN_DIR (default runs/translate-$ROUTER)   extra arguments go to the trainer
#   DRY_RUN=1 prints the trainer's command instead of preparing, training and translating
set -euo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUTER=${ROUTER:-stablemoe}; NPROC=${NPROC:-2}; ITERS=${TRAIN_ITERS:-400}
RUN_DIR=${RUN_DIR:-$REPO_DIR/runs/translate-$ROUTER}
DATA_DIR=${DATA_DIR:-$REPO_DIR/data/mt_processed}
if [ "${DRY_RUN:-0}" != 1 ]; then bash "$REPO_DIR/examples/prepare_mt_corpus.sh"; fi
read -r -a VARIANT_ARGS <<< "$(python "$REPO_DIR/tools/reproduce_mt.py" --print-flags "$ROUTER" --train-iters "$ITERS")"
EP=$NPROC
case "$ROUTER" in dense|dense-ffn) EP=1 ;; esac  # no experts to spread
LAUNCH=(torchrun)
if [ "${DRY_RUN:-0}" = 1 ]; then LAUNCH=(echo torchrun); else mkdir -p "$RUN_DIR/checkpoints"; fi
"${LAUNCH[@]}" --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29500}" -m stablemoe_megatron.train \
  "${VARIANT_ARGS[@]}" --seed "${SEED:-1}" --expert-model-parallel-size "$EP" \
  --data-path "$DATA_DIR/train" --valid-data-path "$DATA_DIR/valid" --test-data-path "$DATA_DIR/test" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA_DIR/spm.model" \
  --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --metrics-file "$RUN_DIR/metrics.jsonl" \
  --tensorboard-dir "$RUN_DIR/tensorboard" "$@"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
python "$REPO_DIR/tools/translate.py" --checkpoint "$RUN_DIR/checkpoints" --input "$REPO_DIR/data/mt/test.jsonl" \
  --beam-size "${BEAM:-4}" --output "$RUN_DIR/translations.jsonl" --score --score-json "$RUN_DIR/scores.json"
