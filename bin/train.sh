#!/usr/bin/env bash
# Stage 4: DeepSpeed ZeRO-2 training. NUM_RANKS processes per node (default: this node's GPUs,
# or 2 CPU ranks without a GPU); for several nodes pass the launcher's flags through
# LAUNCHER_ARGS (e.g. "--hostfile hostfile --master_addr node-1"): NUM_RANKS then applies per host.
# TRAIN_SCRIPT: the script the launcher runs (default pipeline/trainer.py; the tests wrap it).
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
# On several hosts (--hostfile) the launcher starts remote ranks over pdsh/ssh with only the NCCL*,
# PYTHON*, ... variables and a .deepspeed_env file: without TORCH_EXTENSIONS_DIR and the venv's bin on
# PATH (ninja) they would JIT-build FusedAdam into ~/.cache/torch_extensions (often one NFS home for all
# nodes) or fail. A file of this run's own, named by DS_ENV_FILE (read by the launcher on this host),
# forwards them. The launcher would then skip the user's ~/.deepspeed_env and ./.deepspeed_env (or the
# file their own DS_ENV_FILE names): their lines are copied after ours, so they still apply and win.
FORWARDED_ENV=$(mktemp "${TMPDIR:-/tmp}/zh-seq2seq-deepspeed-env.XXXXXX")
trap 'rm -f "$FORWARDED_ENV"' EXIT
for name in PATH TORCH_EXTENSIONS_DIR DS_ACCELERATOR OMP_NUM_THREADS HF_HOME ZH_COMPILED_KERNELS; do
  if [ -n "${!name:-}" ]; then printf '%s=%s\n' "$name" "${!name}" >> "$FORWARDED_ENV"; fi
done
USER_ENV_NAME=${DS_ENV_FILE:-.deepspeed_env}
for user_env in "$HOME/$USER_ENV_NAME" "./$USER_ENV_NAME"; do
  case "$USER_ENV_NAME" in /*) user_env=$USER_ENV_NAME ;; esac
  if [ -f "$user_env" ]; then grep -v '^[[:space:]]*$' "$user_env" >> "$FORWARDED_ENV" || true; fi
  case "$USER_ENV_NAME" in /*) break ;; esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # ranks import the project from this checkout, installed or not
DS_ENV_FILE="$FORWARDED_ENV" python -m deepspeed.launcher.runner --num_gpus "$NUM_RANKS" --master_port "$MASTER_PORT" \
  $LAUNCHER_ARGS "${TRAIN_SCRIPT:-$ROOT/pipeline/trainer.py}" \
  "${DATA_FLAGS[@]}" --output_dir "$RUN_DIR" --model_config "$MODEL_CONFIG" --deepspeed_config "$DS_CONFIG" "$@"
