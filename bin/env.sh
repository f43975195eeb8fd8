# Sourced by the other bin/ scripts: the project root, its .venv on PATH, DeepSpeed's CPU
# accelerator when no GPU is visible (override with DS_ACCELERATOR=cuda), and the GPUs of this node.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ -z "${DS_ACCELERATOR:-}" ] && [ "${GPUS_PER_NODE:-0}" -eq 0 ]; then
  export DS_ACCELERATOR=cpu
fi
# DeepSpeed JIT-builds its ops (FusedAdam) on first use and keeps them here. Node-local
# (/tmp), never on shared storage: nodes would build into one directory at once, and a build killed
# midway leaves a lock file that every rank waits on forever (the trainer names stale locks at start).
# One directory per checkout: builds record their include paths (this checkout's .venv), so two
# checkouts sharing a directory would rebuild each other's ops every time.
CHECKOUT_ID=$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/zh-seq2seq-torch-extensions-$(id -u)-$CHECKOUT_ID}"
