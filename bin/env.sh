# Sourced by the other bin/ scripts: the project root, its .venv on PATH, and DeepSpeed's
# CPU accelerator when no GPU is visible (override with DS_ACCELERATOR=cuda).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
# DeepSpeed JIT-builds its ops (FusedAdam, shm comm) on first use: keep them across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}"
