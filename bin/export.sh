#!/usr/bin/env bash
# Stage 5: consolidate the ZeRO-2 fp32 master weights into a HuggingFace model directory.
set -euo pipefail
source "$(dirname "$0")/env.sh"
RUN_DIR=${RUN_DIR:-work/run-bart}
OUT=${OUT:-work/export-bart}
zh-export --run_dir "$RUN_DIR" --output_dir "$OUT" "$@"
