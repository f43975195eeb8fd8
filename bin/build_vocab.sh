#!/usr/bin/env bash
# Optional: a WordPiece vocab for a corpus without one (special tokens at Google's ids).
set -euo pipefail
source "$(dirname "$0")/env.sh"
CLEAN_DIR=${CLEAN_DIR:-work/clean}
VOCAB=${VOCAB:-work/vocab/vocab.txt}
VOCAB_SIZE=${VOCAB_SIZE:-21128}
zh-build-vocab --input_dir "$CLEAN_DIR" --output_path "$VOCAB" --vocab_size "$VOCAB_SIZE" "$@"
