#!/usr/bin/env bash
# Reproduces uer/bart-chinese-4-768-cluecorpussmall: BART medium (4+4 layers, d 768) with UER-py's
# span masking (--span_masking --span_max_length 3: the uer_bart preset) and sentence shuffling,
# sequences of 512 tokens, --dup_factor 5 (UER-py's default; the card sets none), 1,000,000 steps at
# lr 1e-4, batch 8 per GPU on 8 GPUs, exported at step 250,000 (the published model) and at the end.
#   bin/recipes/uer-bart-medium.sh CORPUS VOCAB [zh-train flags ...]  # cluecorpussmall.txt google_zh_vocab.txt
#   bin/recipes/uer-bart-medium.sh --dry_run                           # 3 steps on CPU ranks on ../shared/data
# Env vars (WORK, NUM_RANKS, NODES, LAUNCHER_ARGS, RECIPE_MFU, ...): see bin/recipes/seed_chain.sh.
set -euo pipefail
export RECIPE=uer-bart-medium MODEL_CONFIG=bart-medium TARGET=bart SEQ_LENGTH=512 TGT_SEQ_LENGTH=128
export ESTIMATE_TGT_LENGTH=512 DRY_RUN_CORPUS=CLUECorpusSmall_sampled.txt  # bart targets are the whole chunk
export MASK_FLAGS="--preset uer_bart --dup_factor ${DUP_FACTOR:-5}"
exec bash "$(dirname "$0")/seed_chain.sh" "$@"
