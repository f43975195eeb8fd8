#!/usr/bin/env bash
# The prepared GPU check (issue #22): one command on a lent GPU machine that has no network, run
# from the project root with the kit of bin/gpu_kit.sh in .gpu_kit/ (the device tool: carry
# [".gpu_kit"], command `bash bin/gpu_check.sh "$OUT"`):
#
#   bash bin/gpu_check.sh [--rehearse] [OUTPUT_DIR]      # OUTPUT_DIR defaults to $OUT
#
# It installs the kit into a venv that sees the machine's own packages (torch, transformers, numba,
# pyarrow, ...: exactly those its python3 sees), puts the project on PYTHONPATH (no install: an editable one needs setuptools in a
# build environment, which --no-index cannot fetch), points ZH_SHARED_DATA at the kit's data, builds
# FusedAdam once into one TORCH_EXTENSIONS_DIR, then runs, in order of value, each under its own
# `timeout` and all inside one deadline (GPU_CHECK_BUDGET_S, default 480 s = 8 min):
#
#   step                                    estimate on one H200      cap     runs if left
#   facts: nvidia-smi, versions                    ~5 s                 60 s  always
#   install the kit, import check                 ~15 s                120 s  always
#   build FusedAdam (CUDA, sm_90, 16 cores)       ~45 s                240 s  always
#       (its .cu compiled with nvcc 13.0 for sm_90 in 18 s on the 2-core CPU VM; the C++ frontend beside it)
#   GPU tier: tests/test_gpu.py -m gpu -x        ~180 s                300 s  >= 60 s
#       (data fixtures ~30 s, then 7 trainer launches of ~20-25 s; the tier's bench test is
#        deselected: it is 8 more launches, ~5-8 min, and the next step runs that bench itself)
#   bench --gpu_quick --cases pegasus-base       ~180 s                300 s  >= 120 s
#       (its data ~30 s, then 4 launches: ours and Seq2SeqTrainer, same and grouped batches)
#   bench --gpu_quick --cases bart-4+4 (bart-medium, 512/512)
#                                                ~180 s                300 s  >= 170 s
#   total by estimate: ~7.1 min, so BART is normally left for a second call,
#   GPU_CHECK_STEPS=bart bash bin/gpu_check.sh "$OUT" (~4 min: install, build, BART; the build is only
#   loaded where the same machine is still warm).
# The deadline holds whatever the machine's speed: a step gets at most what is left of it, a step
# that would get less than its minimum is skipped and says so. Estimates, not measurements: no
# GPU has run this yet; pytest's --durations table in pytest_gpu.log gives the real figures.
#
# Files in OUTPUT_DIR, written as each step goes, so a timeout still returns what finished (at
# most 8 files come back from the device tool, one folder down at most; these are 7):
#   facts.txt        date, host, nvidia-smi, nvcc, python/torch/transformers/deepspeed versions
#   setup.log        the kit's install, the import check, DeepSpeed's env report, the FusedAdam build
#   pytest_gpu.log   the GPU tier, with the time of each test
#   bench_pegasus.log, bench_bart.log   the bench's output (its per-run lines as they come)
#   bench.jsonl      the bench's JSON figures, both cases
#   summary.txt      one line per step: ok / FAILED / TIMED OUT / skipped, with its seconds
# Exit status: 0 when every step that ran passed, 1 when one failed or timed out, 2 for a usage
# or kit error. A failed step does not stop the next ones, except that nothing runs without the kit.
#
# --rehearse (or GPU_CHECK_REHEARSE=1): the CPU rehearsal of tests/test_gpu_kit.py. The same
# install and import check on DeepSpeed's CPU accelerator, the tier collected (every test skips
# without CUDA), and the GPU steps (FusedAdam's CUDA build, the benches) skipped with a message.
#
# Environment: PYTHON (default python3: the machine's interpreter that holds torch), GPU_KIT
# (default .gpu_kit), GPU_CHECK_VENV (default $TMPDIR/zh-gpu-check-venv, recreated each run),
# GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (comma list of tier,pegasus,bart; default all three),
# TORCH_EXTENSIONS_DIR (default $TMPDIR/zh-gpu-check-torch-extensions).
set -uo pipefail  # no -e: every step runs whatever the one before it did

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
REHEARSE=${GPU_CHECK_REHEARSE:-0}
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT_DIR" ] || { echo "gpu_check.sh: one output folder, not '$OUT_DIR' and '$arg'" >&2; exit 2; }
       OUT_DIR="$arg" ;;
  esac
done
OUT_DIR=${OUT_DIR:-${OUT:-}}
[ -n "$OUT_DIR" ] || { echo "gpu_check.sh: give the output folder (first argument, or set OUT)" >&2; exit 2; }
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
KIT="$(cd "${GPU_KIT:-$ROOT/.gpu_kit}" 2>/dev/null && pwd)" \
  || { echo "gpu_check.sh: no kit at ${GPU_KIT:-$ROOT/.gpu_kit}: run bash bin/gpu_kit.sh where there is a network" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/zh-gpu-check-venv}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
STEPS=",${GPU_CHECK_STEPS:-tier,pegasus,bart},"
START=$SECONDS
FAILED=0
SUMMARY="$OUT_DIR/summary.txt"
FACTS="$OUT_DIR/facts.txt"
SETUP="$OUT_DIR/setup.log"
: > "$SUMMARY"

# Everything the steps run sees. DeepSpeed's JIT ops in one node-local folder; the data of the kit;
# the project from the checkout; nothing reaches for a network (there is none: fail fast instead).
export PYTHONUNBUFFERED=1
export ZH_SHARED_DATA="$KIT/data"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/zh-gpu-check-torch-extensions}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
if [ "$REHEARSE" = 1 ]; then export DS_ACCELERATOR=cpu; else export DS_ACCELERATOR=cuda; fi

elapsed() { echo $((SECONDS - START)); }
left() { echo $((BUDGET_S - (SECONDS - START))); }
note() { echo "[$(printf '%4d' "$(elapsed)") s] $*" | tee -a "$SUMMARY"; }
wanted() { [[ "$STEPS" == *",$1,"* ]]; }

# run_step NAME CAP_S MIN_S LOG COMMAND...: COMMAND under `timeout` for at most CAP_S and what is
# left of the deadline, appending to LOG; skipped when less than MIN_S is left.
run_step() {
  local name=$1 cap=$2 min=$3 log=$4; shift 4
  local budget; budget=$(left)
  if [ "$budget" -lt "$min" ]; then
    note "$name: skipped ($budget s left of the ${BUDGET_S} s deadline, it needs $min s)"
    echo "gpu_check.sh: $name skipped: $budget s left of the deadline, it needs $min s" >> "$log"
    return 0
  fi
  [ "$budget" -lt "$cap" ] && cap=$budget
  local began=$SECONDS status
  echo "== $name: $* (limit $cap s)" >> "$log"
  timeout --kill-after=20 "$cap" "$@" >> "$log" 2>&1
  status=$?
  local took=$((SECONDS - began))
  if [ "$status" -eq 0 ]; then
    note "$name: ok (${took} s)"
  elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    FAILED=1; note "$name: TIMED OUT after ${took} s (limit $cap s; see $(basename "$log"))"
  else
    FAILED=1; note "$name: FAILED, exit $status (${took} s; see $(basename "$log"))"
  fi
  [ "$status" -eq 0 ] || leftover_gpu_processes
  return "$status"
}

# A step that failed or was killed at its limit may leave ranks holding the GPU; on a lent machine every process on
# the GPU is this check's own, so they are named and ended by their ids before the next step.
leftover_gpu_processes() {
  command -v nvidia-smi > /dev/null || return 0
  local pids
  pids=$(timeout 20 nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -E '^[0-9]+$')
  [ -n "$pids" ] || return 0
  note "processes still on the GPU after the step, ended: $(echo "$pids" | tr '\n' ' ')"
  for pid in $pids; do kill "$pid" 2>/dev/null; done
  sleep 5
  for pid in $pids; do kill -9 "$pid" 2>/dev/null; done
}

# -- facts, first ---------------------------------------------------------------------------------
{
  echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) ($(uname -srm)), $(nproc) cores"
  echo "mode: $([ "$REHEARSE" = 1 ] && echo "CPU rehearsal" || echo "GPU check"); deadline ${BUDGET_S} s; steps ${STEPS//,/ }"
  echo "checkout: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
  echo "kit: $KIT ($(du -sh "$KIT" 2>/dev/null | cut -f1)); $(head -n 1 "$KIT/kit.txt" 2>/dev/null || echo 'no kit.txt')"
  echo "--- nvidia-smi"
  if command -v nvidia-smi > /dev/null; then
    timeout 20 nvidia-smi 2>&1
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1
  else
    echo "no nvidia-smi"
  fi
  echo "--- nvcc: $(command -v nvcc || echo 'not on PATH')"
  command -v nvcc > /dev/null && nvcc --version 2>&1 | tail -n 2
  echo "--- $PYTHON: $(command -v "$PYTHON" || echo "$PYTHON not found")"
  timeout 60 "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as md, platform, sys
print(f"python {platform.python_version()} ({sys.executable}, prefix {sys.prefix})")
for name in ("torch", "transformers", "tokenizers", "accelerate", "numba", "pyarrow", "numpy", "pytest",
             "ninja", "deepspeed", "hjson", "pydantic", "apex"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} absent")
try:
    import torch
    print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, available "
          f"{torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device 0: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
              f"{p.multi_processor_count} SMs; bf16 {torch.cuda.is_bf16_supported()}")
except Exception as error:  # the facts are written whatever fails
    print(f"torch: {type(error).__name__}: {error}")
EOF
} > "$FACTS" 2>&1
note "facts written ($(basename "$FACTS"))"

if [ "$REHEARSE" != 1 ] && ! timeout 60 "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  note "no CUDA device seen by $PYTHON's torch: nothing to check here (--rehearse is the CPU rehearsal)"
  exit 2
fi

# -- the kit, into a venv that sees the machine's packages ------------------------------------------
# The machine's python3 is itself a venv (/opt/torch/.venv): a venv made from it with
# --system-site-packages would see the base interpreter's site-packages (/usr/lib/python3...), not
# that venv's, where torch is, and packages the machine's python3 itself does not see. So the kit
# venv is a plain venv whose .pth adds exactly the site folders of $PYTHON (their own .pth files
# processed), after its own: the kit's packages first, then what the machine's python3 sees.
install_kit() {
  local kit_python version
  kit_python=$(sed -n 's/^python_version=//p' "$KIT/kit.txt" 2>/dev/null)
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 2
  if [ "$kit_python" != "$version" ]; then
    echo "gpu_check.sh: the kit holds wheels for Python ${kit_python:-?}, this interpreter is $version:" \
         "build one with bash bin/gpu_kit.sh --python-version $version"
    return 2
  fi
  if ! cmp -s "$KIT/requirements.txt" "$ROOT/bin/gpu_kit_requirements.txt"; then
    echo "gpu_check.sh: warning: bin/gpu_kit_requirements.txt changed since the kit was built (using the kit's copy)"
  fi
  rm -rf "$VENV"
  "$PYTHON" -m pip --version > /dev/null 2>&1 || { echo "gpu_check.sh: $PYTHON has no pip to install the kit with"; return 1; }
  "$PYTHON" -m venv --without-pip "$VENV" || return 1
  local site_dir
  site_dir=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || return 1
  "$PYTHON" - "$site_dir/_zh_gpu_check_machine_site.pth" <<'EOF' || return 1
import site, sys
folders = [p for p in site.getsitepackages() if p]
if site.ENABLE_USER_SITE:  # the machine's python3 sees its user site too (a venv does not, by default)
    folders.append(site.getusersitepackages())
line = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in folders)
open(sys.argv[1], "w").write(line + "\n")
print("machine site folders seen by the kit venv:", *folders)
EOF
  # deepspeed at its pin; every other wheel by bare name, so the machine's version wins where it has
  # one that satisfies deepspeed's, pydantic's and pytest's requirements (bin/gpu_kit_requirements.txt).
  local specs
  mapfile -t specs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$KIT/requirements.txt" | grep -v '^$' \
                       | sed -E '/^[Dd]eep[Ss]peed==/!s/[=<>!~].*//')
  # pip's configuration and variables of this machine are not the kit's (an index, find-links or a
  # constraint file would let the install take what the GPU machine will not have).
  timeout 120 env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_REQUIREMENT \
      -u PIP_REQUIRE_VIRTUALENV -u PIP_TARGET -u PIP_PREFIX -u PIP_USER PIP_CONFIG_FILE=/dev/null \
      "$VENV/bin/python" -m pip install --no-index --find-links "$KIT/wheels" --no-cache-dir \
      --disable-pip-version-check --no-input --progress-bar off "${specs[@]}" || return 1
  timeout 120 "$VENV/bin/python" - <<'EOF' || return 1
import importlib, os, sys
venv = sys.prefix
print("import check (python", sys.executable + ")")
for name in ("deepspeed", "hjson", "pydantic", "pydantic_core", "torch", "transformers", "accelerate",
             "numba", "pyarrow", "pytest"):
    module = importlib.import_module(name)
    where = "kit" if os.path.realpath(module.__file__).startswith(os.path.realpath(venv) + os.sep) else "machine"
    print(f"  {name} {getattr(module, '__version__', '?')} from the {where}: {os.path.dirname(module.__file__)}")
import deepspeed.ops.adam, deepspeed.launcher.runner, transformers.integrations.deepspeed  # noqa: E401
from deepspeed.accelerator import get_accelerator
from transformers import Seq2SeqTrainer  # noqa: F401  (the bench's peer)
import pipeline.trainer, pipeline.build_ops, pipeline.convert_to_hf, tests.test_gpu, bench.train_throughput  # noqa
print(f"  DeepSpeed accelerator {get_accelerator().device_name()}; pipeline.trainer, the GPU tier and the bench import")
EOF
  "$VENV/bin/python" -m pip check 2>&1 | sed 's/^/  pip check: /' || true  # the machine's own conflicts show too
  echo "--- DeepSpeed's environment report"
  timeout 60 "$VENV/bin/python" -m deepspeed.env_report 2>&1 | tail -n 40 || true
}
began=$SECONDS
echo "== install the kit into $VENV ($(date -u +%H:%M:%S))" >> "$SETUP"
install_kit >> "$SETUP" 2>&1
status=$?
if [ "$status" -ne 0 ]; then
  note "install: FAILED ($((SECONDS - began)) s; see setup.log): the GPU steps need the kit, none runs"
  tail -n 5 "$SETUP" | sed 's/^/    /'
  exit 2
fi
note "install: ok ($((SECONDS - began)) s; kit venv $VENV)"
PY="$VENV/bin/python"
# The kit venv's python first; the machine interpreter's own bin (ninja, its console scripts) and the
# ninja package's binary last, for torch's extension builder.
machine_bin=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
export PATH="$VENV/bin:$PATH:$machine_bin"
ninja_bin=$("$PY" -c 'import ninja, os; print(getattr(ninja, "BIN_DIR", ""))' 2>/dev/null) \
  && [ -d "$ninja_bin" ] && export PATH="$PATH:$ninja_bin"
echo "deepspeed: $("$PY" -c 'import deepspeed; print(deepspeed.__version__, deepspeed.__file__)' 2>&1)" >> "$FACTS"
echo "ninja: $(ninja --version 2>&1 | head -n 1)" >> "$FACTS"

# -- FusedAdam, built once ---------------------------------------------------------------------------
if [ "$REHEARSE" = 1 ]; then
  note "build FusedAdam: skipped (rehearsal: the CUDA build needs the GPU machine)"
else
  # pipeline.build_ops builds in a worker process; an explicit arch list (the GPU's, e.g. 9.0) spares
  # DeepSpeed probing the device there, and the ranks, which inherit it, ask for the same build.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
                           | head -n 1 | tr -d ' ')
    if [[ "$TORCH_CUDA_ARCH_LIST" =~ ^[0-9]+\.[0-9]+$ ]]; then export TORCH_CUDA_ARCH_LIST; else unset TORCH_CUDA_ARCH_LIST; fi
  fi
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset (DeepSpeed probes the device)}" >> "$FACTS"
  run_step "build FusedAdam into $TORCH_EXTENSIONS_DIR" 240 0 "$SETUP" "$PY" -m pipeline.build_ops
fi

# -- 1. the GPU tier ---------------------------------------------------------------------------------
if wanted tier; then
  run_step "GPU tier (pytest -m gpu -x tests/test_gpu.py)" 300 60 "$OUT_DIR/pytest_gpu.log" \
    "$PY" -m pytest -m gpu -x -v -rA --durations=0 -p no:cacheprovider tests/test_gpu.py \
    --deselect tests/test_gpu.py::test_throughput_benchmark_gpu_path_runs
fi

# -- 2. and 3. the throughput bench ------------------------------------------------------------------
bench() {  # bench CASE LOG: --gpu_quick for one case; its JSON lines go to bench.jsonl
  local case=$1 log=$2
  if [ "$REHEARSE" = 1 ]; then
    note "bench $case: skipped (rehearsal: --gpu_quick needs CUDA)"
    return 0
  fi
  run_step "bench --gpu_quick --cases $case" 300 "$3" "$log" "$PY" -m bench.train_throughput --gpu_quick --cases "$case"
  grep '^{' "$log" >> "$OUT_DIR/bench.jsonl" 2>/dev/null || true
}
wanted pegasus && bench pegasus-base "$OUT_DIR/bench_pegasus.log" 120
wanted bart && bench bart-4+4 "$OUT_DIR/bench_bart.log" 170

note "done in $(elapsed) s: $([ "$FAILED" = 0 ] && echo "every step that ran passed" || echo "a step FAILED")"
exit "$FAILED"
