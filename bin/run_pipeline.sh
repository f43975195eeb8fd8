#!/usr/bin/env bash
# The whole chain for one target: clean -> tokenize -> mask -> train -> export -> generate.
# Every stage's knobs are the env vars of its own script; extra flags go to train.
set -euo pipefail
BIN="$(cd "$(dirname "$0")" && pwd)"
RAW=${RAW:?set RAW to a corpus file or directory}
VOCAB=${VOCAB:?set VOCAB to a BERT vocab.txt}
TARGET=${TARGET:-bart}
MODEL_CONFIG=${MODEL_CONFIG:-$([ "$TARGET" = gsg ] && echo pegasus-tiny || echo bart-tiny)}
WORK=${WORK:-work}
PROMPT=${PROMPT:-内容丰富、版式设计考究、图片华丽、印制精美。[MASK]纸箱内还放了充气袋用于保护。}

RAW="$RAW" OUT="$WORK/clean" "$BIN/clean.sh"
CLEAN_DIR="$WORK/clean" VOCAB="$VOCAB" OUT="$WORK/tokenized" "$BIN/tokenize.sh"
TOKENIZED_DIR="$WORK/tokenized" TARGET="$TARGET" OUT="$WORK/examples-$TARGET" "$BIN/mask.sh"
DATA_DIR="$WORK/examples-$TARGET" RUN_DIR="$WORK/run-$TARGET" MODEL_CONFIG="$MODEL_CONFIG" "$BIN/train.sh" "$@"
RUN_DIR="$WORK/run-$TARGET" OUT="$WORK/export-$TARGET" "$BIN/export.sh"
echo "$PROMPT" | MODEL_DIR="$WORK/export-$TARGET" "$BIN/generate.sh"
