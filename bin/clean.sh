#!/usr/bin/env bash
# Stage 1: raw text -> normalized, filtered JSONL document shards.
set -euo pipefail
source "$(dirname "$0")/env.sh"
RAW=${RAW:?set RAW to a corpus file or directory}
OUT=${OUT:-work/clean}
zh-clean --input_paths $RAW --output_dir "$OUT" "$@"
