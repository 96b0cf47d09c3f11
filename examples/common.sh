#!/bin/bash
# Shared argument arrays for the recipes in this directory (sourced, not run).
#
#   SIZE      tiny (CPU, minutes) | base | large   (paper Table 7)
#   DATA_PATH Megatron blend or prefix of .bin/.idx data (default: the bundled corpus, tiny only)
#   TOKENIZER_FLAGS tokenizer flags (default: GPT-2 BPE from $VOCAB_FILE/$MERGE_FILE for base/large,
#                   the bundled corpus' SentencePiece model for tiny)
#   RUN_DIR   where checkpoints, TensorBoard events and metrics go
#   NPROC / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT   torchrun settings
#   TP / PP / EP  parallel sizes (default 1 / 1 / min(experts, world size))
set -euo pipefail

SIZE=${SIZE:-tiny}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR=${RUN_DIR:-$REPO_DIR/runs/${RUN_NAME:-$(basename "$0" .sh)-$SIZE}}
NPROC=${NPROC:-$([ "$SIZE" = tiny ] && echo 2 || echo 8)}
NNODES=${NNODES:-1}

case "$SIZE" in
  tiny)   # a few minutes on 2 CPU cores
    LAYERS=4; HIDDEN=128; FFN=512; HEADS=4; SEQ=128; EXPERTS=${EXPERTS:-4}; SUBLAYERS=2
    MICRO=8; GLOBAL=32; ITERS=${TRAIN_ITERS:-400}; WARMUP=40; LR=1e-3
    EVAL_INTERVAL=100; EVAL_ITERS=4; LOG_INTERVAL=20; SAVE_INTERVAL=200 ;;
  base)   # paper: 12 layers, d 768, 32 experts of 3 sublayers, 512K tokens/batch, 60K steps
    LAYERS=12; HIDDEN=768; FFN=3072; HEADS=12; SEQ=1024; EXPERTS=${EXPERTS:-32}; SUBLAYERS=3
    MICRO=${MICRO:-8}; GLOBAL=512; ITERS=${TRAIN_ITERS:-60000}; WARMUP=2000; LR=6e-4
    EVAL_INTERVAL=1000; EVAL_ITERS=50; LOG_INTERVAL=50; SAVE_INTERVAL=2000 ;;
  large)  # paper: 24 layers, d 1024, 64 experts of 6 sublayers
    LAYERS=24; HIDDEN=1024; FFN=4096; HEADS=16; SEQ=1024; EXPERTS=${EXPERTS:-64}; SUBLAYERS=6
    MICRO=${MICRO:-4}; GLOBAL=512; ITERS=${TRAIN_ITERS:-60000}; WARMUP=2000; LR=3e-4
    EVAL_INTERVAL=1000; EVAL_ITERS=50; LOG_INTERVAL=50; SAVE_INTERVAL=2000 ;;
  *) echo "SIZE must be tiny, base or large (got $SIZE)" >&2; exit 2 ;;
esac

if [ "$SIZE" = tiny ]; then
  DATA_DIR=${DATA_DIR:-$REPO_DIR/data/processed}
  DATA_PATH=${DATA_PATH:-$DATA_DIR/corpus_train_text_document}
  read -r -a DATA_BLEND <<< "$DATA_PATH"   # a prefix, or a weighted blend "W1 P1 W2 P2 ..."
  DATA_ARGS=(--data-path "${DATA_BLEND[@]}" --split "100,0,0"
             --valid-data-path "$DATA_DIR/corpus_valid_text_document"
             --test-data-path "$DATA_DIR/corpus_test_text_document")
  read -r -a TOKENIZER_ARGS <<< "${TOKENIZER_FLAGS:---tokenizer-type SentencePieceTokenizer --tokenizer-model $DATA_DIR/spm.model}"
else
  : "${DATA_PATH:?set DATA_PATH to a Megatron .bin/.idx prefix or blend}"
  read -r -a DATA_BLEND <<< "$DATA_PATH"
  DATA_ARGS=(--data-path "${DATA_BLEND[@]}" --split "${SPLIT:-969,30,1}")
  read -r -a TOKENIZER_ARGS <<< "${TOKENIZER_FLAGS:---tokenizer-type GPT2BPETokenizer --vocab-file ${VOCAB_FILE:?set VOCAB_FILE} --merge-file ${MERGE_FILE:?set MERGE_FILE}}"
fi

WORLD=$((NPROC * NNODES))
TP=${TP:-1}; PP=${PP:-1}
EP=${EP:-$(( EXPERTS < WORLD / (TP * PP) ? EXPERTS : WORLD / (TP * PP) ))}
export SUBLAYERS  # used by the recipes that source this file

DISTRIBUTED_ARGS=(--nproc-per-node "$NPROC" --nnodes "$NNODES")
if [ "$NNODES" -gt 1 ]; then
  DISTRIBUTED_ARGS+=(--rdzv-id "${SLURM_JOB_ID:-stablemoe}" --rdzv-backend c10d
                     --rdzv-endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" --node-rank "${NODE_RANK:-0}")
else
  DISTRIBUTED_ARGS+=(--master-port "${MASTER_PORT:-29500}")
fi

MODEL_ARGS=(--num-layers "$LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN" --num-attention-heads "$HEADS"
            --seq-length "$SEQ" --max-position-embeddings "$SEQ" --hidden-dropout 0 --attention-dropout 0)
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
               --expert-model-parallel-size "$EP")
if [ "$TP" -gt 1 ]; then PARALLEL_ARGS+=(--sequence-parallel); fi
TRAINING_ARGS=(--micro-batch-size "$MICRO" --global-batch-size "$GLOBAL" --train-iters "$ITERS"
               --lr "$LR" --min-lr 0 --lr-decay-style linear --lr-warmup-iters "$WARMUP"
               --adam-beta1 0.9 --adam-beta2 0.98 --weight-decay 0.01 --clip-grad 0.1 --seed "${SEED:-1234}")
if [ "$SIZE" != tiny ]; then TRAINING_ARGS+=(--bf16); fi
OUTPUT_ARGS=(--save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval "$SAVE_INTERVAL"
             --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL"
             --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-file "$RUN_DIR/metrics.jsonl")

# stage2_start FRACTION: the iteration at which stage 2 starts, or nothing for "none" (stage 1 only).
stage2_start_args() {
  if [ "${1:-0.1}" != none ]; then
    echo "--moe-stage2-start-iter $(python3 -c "print(int($ITERS * ${1:-0.1}))")"
  fi
}

# run_training ARGS...: launch the trainer with every array above plus the recipe's arguments.
run_training() {
  mkdir -p "$RUN_DIR/checkpoints"
  local launcher=(torchrun "${DISTRIBUTED_ARGS[@]}")
  if [ "${DRY_RUN:-0}" = 1 ]; then launcher=(echo torchrun "${DISTRIBUTED_ARGS[@]}"); fi
  "${launcher[@]}" -m stablemoe_megatron.train "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
}
