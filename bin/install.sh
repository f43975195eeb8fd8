#!/usr/bin/env bash
# Creates a virtual environment (default .venv in the project root) if missing and installs the
# project with every extra into it: data stages, DeepSpeed trainer, test tools, benchmark
# baselines, the loss plot. Versions come from bin/constraints.txt (what CI tests); setup.cfg
# itself only states ranges. Safe to re-run.
#   VENV=.venv-transformers4 CONSTRAINTS=bin/constraints-transformers4.txt bin/install.sh
# builds the transformers 4.57 environment of .ci/run's compatibility pass.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-data,train,test,bench,plot}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-bin/constraints.txt}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e ".[${EXTRAS}]"
echo "installed into $(pwd)/$VENV: $("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "deepspeed", "transformers", "tokenizers")))')"
