#!/usr/bin/env bash
# The chain both seed recipes run; bin/recipes/uer-pegasus-base.sh and uer-bart-medium.sh set the
# model and the masking (RECIPE, MODEL_CONFIG, MASK_FLAGS, SEQ_LENGTH, TGT_SEQ_LENGTH, DRY_RUN_CORPUS)
# and run this. Raw corpus -> clean -> vocab (given, or VOCAB=build) -> tokenize -> mask -> the
# schedule's GPU-hours -> train (DeepSpeed ZeRO-2) -> export (the published step and the last) ->
# the card's snippet.
#
#   RECIPE.sh [--dry_run] [CORPUS [VOCAB]] [zh-train flags ...]
#
# CORPUS and VOCAB are arguments or env vars; WORK (default work/recipes/RECIPE, or
# work/recipes/RECIPE-dry-run) holds every stage's output. Several nodes: LAUNCHER_ARGS="--hostfile
# hostfile --master_addr node-1" NODES=2 (NUM_RANKS GPUs per node), as for bin/train.sh. The global
# batch stays UER-py's 64 (8 per GPU on 8 GPUs): on other GPU counts the gradient accumulation makes
# it up. Nothing is deleted: each stage replaces only its own earlier output and refuses anything
# else, and training resumes from the run's latest checkpoint when re-run.
# --dry_run: the same architecture, lengths, masking and flags for 3 steps on 2 CPU ranks
# (ds_configs/cpu_zero2.json) on ../shared/data with Google's vocab, 2 examples per rank
# (DRY_RUN_MICRO_BATCH_SIZE), checkpoints, eval and the export step scaled to the 3 steps.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=bin/env.sh
source "$ROOT/bin/env.sh"
BIN="$ROOT/bin"
: "${RECIPE:?run bin/recipes/uer-pegasus-base.sh or bin/recipes/uer-bart-medium.sh}"

DRY_RUN=0
POSITIONAL=()
TRAIN_ARGS=()
for arg in "$@"; do
  if [ "$arg" = --dry_run ]; then DRY_RUN=1
  elif [ ${#TRAIN_ARGS[@]} -eq 0 ] && [ "${arg#-}" = "$arg" ]; then POSITIONAL+=("$arg")
  else TRAIN_ARGS+=("$arg"); fi
done
if [ ${#POSITIONAL[@]} -gt 2 ]; then
  echo "$RECIPE: usage: $0 [--dry_run] [CORPUS [VOCAB]] [zh-train flags ...]" >&2; exit 2
fi
CORPUS=${POSITIONAL[0]:-${CORPUS:-}}
VOCAB=${POSITIONAL[1]:-${VOCAB:-}}

# The seeds' schedule (their cards: 1,000,000 steps, lr 1e-4, batch 8 on 8 GPUs, a checkpoint every
# 100,000 steps, the model published at step 250,000). UER-py saves only at multiples of
# --save_checkpoint_steps, so the cards' flags never wrote step 250,000: every 50,000 writes it and
# every 100,000 one, and all 20 are kept (PEGASUS base ~3 GB each, BART medium ~1 GB).
# UER-py's default warmup is 10% of the steps, then linear decay to 0.
TOTAL_STEPS=1000000 SAVE_CHECKPOINT_STEPS=50000 KEEP_LAST_CHECKPOINTS=${KEEP_LAST_CHECKPOINTS:-20}
EXPORT_STEP=250000 WARMUP_STEPS=100000 LEARNING_RATE=1e-4 LOG_EVERY_STEPS=100
EVAL_EXAMPLES=${EVAL_EXAMPLES:-10000} EVAL_EVERY_STEPS=50000
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8} GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
SCHEDULE_BATCH_SIZE=$GLOBAL_BATCH_SIZE  # what the estimate is for, also in a dry run
SHARED_DATA=${ZH_SHARED_DATA:-$ROOT/../shared/data}
if [ "$DRY_RUN" = 1 ]; then
  CORPUS=${CORPUS:-$SHARED_DATA/$DRY_RUN_CORPUS}
  VOCAB=${VOCAB:-$SHARED_DATA/google_zh_vocab.txt}
  WORK=${WORK:-$ROOT/work/recipes/$RECIPE-dry-run}
  export DS_ACCELERATOR=cpu DS_CONFIG=$ROOT/ds_configs/cpu_zero2.json
  NUM_RANKS=${NUM_RANKS:-2} NODES=1 LAUNCHER_ARGS=
  # Checkpoints at steps 2 and 3 (PEGASUS base: ~3 GB each), the earlier one exported by tag like step 250,000.
  TRAIN_STEPS=3 SAVE_CHECKPOINT_STEPS=2 KEEP_LAST_CHECKPOINTS=2 RUN_EXPORT_STEP=2 WARMUP_STEPS=1
  LOG_EVERY_STEPS=1 EVAL_EXAMPLES=16 EVAL_EVERY_STEPS=3
  # 2 examples per rank, not 8: a step of 8 per rank takes 1-3 minutes on 2 cores (BART / PEGASUS).
  MICRO_BATCH_SIZE=${DRY_RUN_MICRO_BATCH_SIZE:-2}
  GLOBAL_BATCH_SIZE=$((MICRO_BATCH_SIZE * NUM_RANKS))
else
  : "${CORPUS:?set CORPUS (or pass it as the first argument) to a raw CLUECorpusSmall-format corpus}"
  : "${VOCAB:?set VOCAB (or pass it second) to Google's Chinese vocab.txt (the seeds'), or VOCAB=build}"
  WORK=${WORK:-$ROOT/work/recipes/$RECIPE}
  NUM_RANKS=${NUM_RANKS:-$GPUS_PER_NODE} NODES=${NODES:-1}
  if [ "$NUM_RANKS" -eq 0 ]; then
    echo "$RECIPE: no GPU on this node: set NUM_RANKS (GPUs per node) to launch elsewhere with" \
      "LAUNCHER_ARGS, or pass --dry_run" >&2
    exit 2
  fi
  TRAIN_STEPS=$TOTAL_STEPS RUN_EXPORT_STEP=$EXPORT_STEP
fi
RANKS=$((NUM_RANKS * NODES))
if [ $((GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * RANKS))) -ne 0 ]; then
  echo "$RECIPE: a global batch of $GLOBAL_BATCH_SIZE is not a multiple of $MICRO_BATCH_SIZE per GPU x $RANKS GPUs:" \
    "set MICRO_BATCH_SIZE or GLOBAL_BATCH_SIZE (NODES: how many nodes LAUNCHER_ARGS starts)" >&2
  exit 2
fi
ACCUMULATION=$((GLOBAL_BATCH_SIZE / (MICRO_BATCH_SIZE * RANKS)))
PROCESSES=${PROCESSES:-$(nproc)}
export NUM_RANKS LAUNCHER_ARGS

# REUSE_DATA=1 continues a run (e.g. after a node failure) without rebuilding its examples.
if [ "${REUSE_DATA:-0}" = 1 ] && [ -f "$WORK/examples/manifest.json" ]; then
  echo "$RECIPE: REUSE_DATA=1: training on the existing $WORK/examples" >&2
else
  RAW="$CORPUS" OUT="$WORK/clean" "$BIN/clean.sh" --processes_num "$PROCESSES"
  if [ "$VOCAB" = build ]; then
    VOCAB="$WORK/vocab/vocab.txt"
    CLEAN_DIR="$WORK/clean" VOCAB="$VOCAB" VOCAB_SIZE=21128 "$BIN/build_vocab.sh"
  fi
  CLEAN_DIR="$WORK/clean" VOCAB="$VOCAB" OUT="$WORK/tokenized" "$BIN/tokenize.sh" --processes_num "$PROCESSES"
  # shellcheck disable=SC2086  # MASK_FLAGS: the recipe's mask flags, one word each
  TOKENIZED_DIR="$WORK/tokenized" TARGET="$TARGET" SEQ_LENGTH="$SEQ_LENGTH" TGT_SEQ_LENGTH="$TGT_SEQ_LENGTH" \
    OUT="$WORK/examples" "$BIN/mask.sh" $MASK_FLAGS --processes_num "$PROCESSES"
fi

# What the full schedule costs (also in a dry run, which is 3 steps of it) on the detected GPU, or an
# H100 SXM: full-length examples, which is about what batches padded to their longest example compute.
python -m pipeline.recipe_estimate --label "$RECIPE" --model_config "$MODEL_CONFIG" \
  --source_length "$SEQ_LENGTH" --target_length "$ESTIMATE_TGT_LENGTH" \
  --total_steps "$TOTAL_STEPS" --global_batch_size "$SCHEDULE_BATCH_SIZE" --gpus 8 --export_step "$EXPORT_STEP" \
  ${RECIPE_MFU:+--mfu "$RECIPE_MFU"}

DATA_DIR="$WORK/examples" RUN_DIR="$WORK/run" MODEL_CONFIG="$MODEL_CONFIG" "$BIN/train.sh" \
  --total_steps "$TRAIN_STEPS" --learning_rate "$LEARNING_RATE" --warmup_steps "$WARMUP_STEPS" --lr_decay linear \
  --micro_batch_size "$MICRO_BATCH_SIZE" --gradient_accumulation_steps "$ACCUMULATION" \
  --global_batch_size "$GLOBAL_BATCH_SIZE" --save_checkpoint_steps "$SAVE_CHECKPOINT_STEPS" \
  --keep_last_checkpoints "$KEEP_LAST_CHECKPOINTS" --eval_examples "$EVAL_EXAMPLES" \
  --eval_every_steps "$EVAL_EVERY_STEPS" --log_every_steps "$LOG_EVERY_STEPS" "${TRAIN_ARGS[@]}"

PUBLISHED_TAG=$(printf 'step%08d' "$RUN_EXPORT_STEP")
RUN_DIR="$WORK/run" OUT="$WORK/export-$PUBLISHED_TAG" "$BIN/export.sh" --tag "$PUBLISHED_TAG"
RUN_DIR="$WORK/run" OUT="$WORK/export" "$BIN/export.sh"
echo "$RECIPE: exported $WORK/export-$PUBLISHED_TAG (the step the seed was published at) and" \
  "$WORK/export (the last step)" >&2
# On a busy 2-core machine torch's two threads wait on each other: one generates ~5x faster there.
if [ "$DRY_RUN" = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
python -m pipeline.hf_snippet "$WORK/export-$PUBLISHED_TAG" "$WORK/export"
