#!/bin/bash
# Shared argument arrays for the recipes in this directory (sourced, not run).
#
#   SIZE      tiny (CPU, minutes) | base | large (paper Table 7): the size/recipe file configs/$SIZE.yaml
#             (model and MoE shape, batch, iterations, optimizer, intervals), given to the trainer as --config
#   CONFIG_FILE  another size/recipe file instead of configs/$SIZE.yaml (see configs/README.md)
#   EXPERTS / TRAIN_ITERS / MICRO / SEED  override the file's experts, iterations, micro-batch size, seed
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

# size_config get|flags|list ...: read a size/recipe file (stablemoe_megatron/size_configs.py, no install needed)
size_config() { python3 "$REPO_DIR/stablemoe_megatron/size_configs.py" "$@"; }
CONFIG_FILE=${CONFIG_FILE:-$REPO_DIR/configs/$SIZE.yaml}
if [ ! -f "$CONFIG_FILE" ]; then
  echo "SIZE must be one of $(size_config list) (got $SIZE: no file $CONFIG_FILE)" >&2
  exit 2
fi
# What the shell itself needs from the file: the experts (EP default), the sublayers (exported for the
# recipes) and the iterations (stage 2 start).
SIZE_VALUES=$(size_config get "$CONFIG_FILE" moe.num_experts moe.sublayers_per_expert training.train_iters)
read -r CONFIG_EXPERTS SUBLAYERS CONFIG_ITERS <<< "$SIZE_VALUES"
CONFIG_ARGS=(--config "$CONFIG_FILE")
# The environment's overrides of the file: flags, which win over --config.
OVERRIDE_ARGS=()
if [ -n "${TRAIN_ITERS:-}" ]; then OVERRIDE_ARGS+=(--train-iters "$TRAIN_ITERS"); fi
if [ -n "${MICRO:-}" ]; then OVERRIDE_ARGS+=(--micro-batch-size "$MICRO"); fi
if [ -n "${SEED:-}" ]; then OVERRIDE_ARGS+=(--seed "$SEED"); fi
EXPERT_ARGS=()  # the number of experts of the MoE recipes (pretrain_dense.sh empties it)
if [ -n "${EXPERTS:-}" ]; then EXPERT_ARGS=(--num-experts "$EXPERTS"); else EXPERTS=$CONFIG_EXPERTS; fi
ITERS=${TRAIN_ITERS:-$CONFIG_ITERS}

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

PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
               --expert-model-parallel-size "$EP")
if [ "$TP" -gt 1 ]; then PARALLEL_ARGS+=(--sequence-parallel); fi
OUTPUT_ARGS=(--save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints"
             --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-file "$RUN_DIR/metrics.jsonl")

# stage2_start FRACTION: the iteration at which stage 2 starts, or nothing for "none" (stage 1 only).
stage2_start_args() {
  if [ "${1:-0.1}" != none ]; then
    echo "--moe-stage2-start-iter $(python3 -c "print(int($ITERS * ${1:-0.1}))")"
  fi
}

# run_training ARGS...: launch the trainer with the size file, every array above and the recipe's arguments.
run_training() {
  mkdir -p "$RUN_DIR/checkpoints"
  local launcher=(torchrun "${DISTRIBUTED_ARGS[@]}")
  if [ "${DRY_RUN:-0}" = 1 ]; then launcher=(echo torchrun "${DISTRIBUTED_ARGS[@]}"); fi
  "${launcher[@]}" -m stablemoe_megatron.train "${CONFIG_ARGS[@]}" "${OVERRIDE_ARGS[@]}" "${EXPERT_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
}
