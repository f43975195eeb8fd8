#!/usr/bin/env bash
# Generate from an exported model: one input per line on stdin (or --input_file).
set -euo pipefail
source "$(dirname "$0")/env.sh"
MODEL_DIR=${MODEL_DIR:-work/export-bart}
zh-generate --model_dir "$MODEL_DIR" "$@"
