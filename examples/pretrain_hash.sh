#!/bin/bash
# Hash layer baseline: a fixed token-id -> expert table. HASH_TABLE=random|frequency
#   SIZE=tiny|base|large
# shellcheck source=examples/common.sh
source "$(dirname "$0")/common.sh"
MOE_ARGS=(--moe-router hash --moe-hash-table "${HASH_TABLE:-random}" --moe-layer-positions "${POSITIONS:-middle}")
run_training "${MOE_ARGS[@]}" "$@"
