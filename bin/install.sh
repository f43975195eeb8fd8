#!/usr/bin/env bash
# Creates .venv in the project root (if missing) and installs the project with every
# extra into it: data stages, DeepSpeed trainer, test tools, benchmark baselines, the loss plot. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-data,train,test,bench,plot}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
echo "installed into $(pwd)/.venv: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "transformers")))')"
