#!/usr/bin/env bash
# Stage 4: DeepSpeed ZeRO-2 training. NUM_RANKS processes per node (default: this node's GPUs,
# or 2 CPU ranks without a GPU); for several nodes pass the launcher's flags through
# LAUNCHER_ARGS (e.g. "--hostfile hostfile --master_addr node-1"): NUM_RANKS then applies per host.
# A weighted mixture of corpora instead of DATA_DIR: DATA_DIRS="work/examples-news:0.6 work/examples-web:0.4".
set -euo pipefail
source "$(dirname "$0")/env.sh"
DATA_DIR=${DATA_DIR:-work/examples-bart}
if [ -n "${DATA_DIRS:-}" ]; then DATA_FLAGS=(--data_dirs $DATA_DIRS); else DATA_FLAGS=(--data_dir "$DATA_DIR"); fi
RUN_DIR=${RUN_DIR:-work/run-bart}
MODEL_CONFIG=${MODEL_CONFIG:-bart-tiny}
if [ "${GPUS_PER_NODE:-0}" -gt 0 ]; then NUM_RANKS=${NUM_RANKS:-$GPUS_PER_NODE}; fi
NUM_RANKS=${NUM_RANKS:-2}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}
if [ "${DS_ACCELERATOR:-}" = cpu ]; then DS_CONFIG=${DS_CONFIG:-$ROOT/ds_configs/cpu_zero2.json}; fi
DS_CONFIG=${DS_CONFIG:-$ROOT/ds_configs/zero2_bf16.json}
deepspeed --num_gpus "$NUM_RANKS" --master_port "$MASTER_PORT" $LAUNCHER_ARGS "$ROOT/pipeline/trainer.py" \
  "${DATA_FLAGS[@]}" --output_dir "$RUN_DIR" --model_config "$MODEL_CONFIG" --deepspeed_config "$DS_CONFIG" "$@"
