#!/bin/bash
# The README's quick start: bundled corpus -> tokenizer + .bin/.idx -> a small StableMoE model trained
# through both stages on 2 CPU processes (expert parallel 2) -> validation and test perplexity.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$HERE/prepare_corpus.sh"
SIZE=tiny RUN_NAME=${RUN_NAME:-quickstart} bash "$HERE/pretrain_stablemoe.sh" "$@"
