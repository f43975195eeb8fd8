#!/usr/bin/env bash
# Installs the project with its test extra into .venv, then runs the test suite.
# Extra arguments go to pytest (e.g. bin/test.sh -m "not slow" -x).
set -euo pipefail
BIN="$(cd "$(dirname "$0")" && pwd)"
"$BIN/install.sh"
source "$BIN/env.sh"
cd "$ROOT"
python -m pytest "$@"
