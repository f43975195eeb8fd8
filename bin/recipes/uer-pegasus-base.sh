#!/usr/bin/env bash
# Reproduces uer/pegasus-base-chinese-cluecorpussmall: PEGASUS base (12+12 layers, d 768) with
# UER-py's gap-sentence generation (30% of sentences at random, never the last, one [MASK] each;
# --dup_factor 1 as on the card), source 512 / target 128 tokens, 1,000,000 steps at lr 1e-4, batch 8
# per GPU on 8 GPUs, exported at step 250,000 (the published model) and at the end.
#   bin/recipes/uer-pegasus-base.sh CORPUS VOCAB [zh-train flags ...]  # cluecorpussmall_bert.txt google_zh_vocab.txt
#   bin/recipes/uer-pegasus-base.sh --dry_run                           # 3 steps on CPU ranks on ../shared/data
# Env vars (WORK, NUM_RANKS, NODES, LAUNCHER_ARGS, RECIPE_MFU, ...): see bin/recipes/seed_chain.sh.
set -euo pipefail
export RECIPE=uer-pegasus-base MODEL_CONFIG=pegasus-base TARGET=gsg SEQ_LENGTH=512 TGT_SEQ_LENGTH=128
export ESTIMATE_TGT_LENGTH=128 DRY_RUN_CORPUS=CLUECorpusSmall_bert_sampled.txt
export MASK_FLAGS="--preset uer_gsg --sentence_selection_strategy random --dup_factor ${DUP_FACTOR:-1}"
exec bash "$(dirname "$0")/seed_chain.sh" "$@"
