#!/usr/bin/env bash
# Stage 2: documents -> Arrow shards of BERT WordPiece ids per sentence.
set -euo pipefail
source "$(dirname "$0")/env.sh"
CLEAN_DIR=${CLEAN_DIR:-work/clean}
VOCAB=${VOCAB:?set VOCAB to a BERT vocab.txt}
OUT=${OUT:-work/tokenized}
zh-tokenize --input_dir "$CLEAN_DIR" --vocab_path "$VOCAB" --output_dir "$OUT" "$@"
