#!/usr/bin/env bash
# Stage 3: tokenized documents -> BART (bart) or PEGASUS (gsg) training examples.
set -euo pipefail
source "$(dirname "$0")/env.sh"
TOKENIZED_DIR=${TOKENIZED_DIR:-work/tokenized}
TARGET=${TARGET:-bart}
SEQ_LENGTH=${SEQ_LENGTH:-512}
TGT_SEQ_LENGTH=${TGT_SEQ_LENGTH:-128}
OUT=${OUT:-work/examples-$TARGET}
zh-mask --input_dir "$TOKENIZED_DIR" --output_dir "$OUT" --target "$TARGET" \
  --seq_length "$SEQ_LENGTH" --tgt_seq_length "$TGT_SEQ_LENGTH" "$@"
