#!/usr/bin/env bash
# The compatibility pass on transformers 4.57 (the 4.x line users still run): builds .venv-transformers4
# from bin/constraints-transformers4.txt, then runs the tests of everything that touches transformers:
# HF model classes, export (the chain), import from UER, the card's snippet, generate, evaluate, the
# numerics reference, the tokenizer parity tests and the bench's Seq2SeqTrainer helpers. .ci/run runs it
# after bin/test.sh (the whole suite, on transformers 5). Extra arguments go to pytest.
set -euo pipefail
BIN="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$BIN/.." && pwd)"
VENV=.venv-transformers4 CONSTRAINTS=bin/constraints-transformers4.txt "$BIN/install.sh"
cd "$ROOT"
# bin/env.sh's settings, with this venv's interpreter and ops cache: an op built for .venv records
# .venv's include paths, so sharing its cache would rebuild FusedAdam for each environment in turn.
source "$BIN/env.sh"
export PATH="$ROOT/.venv-transformers4/bin:$PATH"
export TORCH_EXTENSIONS_DIR="$TORCH_EXTENSIONS_DIR-transformers4"
python -m pytest -p no:cacheprovider \
  tests/test_hf_versions.py tests/test_wordpiece.py tests/test_vocab.py \
  tests/test_pipeline_chain.py tests/test_uer_interop.py tests/test_evaluate.py tests/test_numerics_reference.py \
  tests/test_gpu_readiness.py tests/test_bench_scripts.py tests/test_cli.py \
  "tests/test_bad_inputs.py::test_model_commands_refuse_bad_input" "$@"
