#!/usr/bin/env bash
# Score an HF model (an export, a UER-py import) on masked examples: loss, perplexity, token accuracy,
# exact match; pass --held_out N for the examples zh-train --eval_examples N held out.
set -euo pipefail
source "$(dirname "$0")/env.sh"
MODEL_DIR=${MODEL_DIR:-work/export-bart}
DATA_DIR=${DATA_DIR:-work/examples-bart}
zh-evaluate --model_dir "$MODEL_DIR" --data_dir "$DATA_DIR" "$@"
