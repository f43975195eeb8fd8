#!/usr/bin/env bash
# Builds the GPU check's kit (issue #22): everything a lent GPU machine lacks, into the git-ignored
# .gpu_kit/, for bin/gpu_check.sh to install there without a network. Runs here, with network:
#
#   bash bin/gpu_kit.sh                        # .gpu_kit/ for the GPU machine (CPython 3.12, manylinux x86_64)
#   bash bin/gpu_kit.sh --python-version 3.11 --out /tmp/kit311    # a kit for this machine (the CPU rehearsal)
#
# What goes in:
#   wheels/           one wheel per line of bin/gpu_kit_requirements.txt: deepspeed built here with
#                     `pip wheel --no-deps` (pure Python: py3-none-any), the others downloaded with
#                     `pip download --no-deps --only-binary=:all:` for the target interpreter and platform
#   data/             the files of ../shared/data (or $ZH_SHARED_DATA) that tests/test_gpu.py's fixtures
#                     and bench/train_throughput.py read; ../shared does not travel to the GPU machine
#   requirements.txt  the list the wheels were made from (gpu_check.sh installs from this copy)
#   kit.txt           the target (python_version=, platforms=), then a sha256 and size per file
#
# Idempotent: the deepspeed wheel already built is reused; the wheel folder is rebuilt beside the old one and
# swapped in whole, so no wheel of an earlier list stays behind. Prints the kit's size and fails
# above MAX_MIB (the device tool carries at most 64 MiB in all, the working tree included).
#
# Options: --out DIR (default .gpu_kit), --python-version X.Y (default 3.12), --platform TAG
# (repeatable; default manylinux x86_64 from glibc 2.17 to 2.28: torch 2.11's cu130 wheels need
# 2.28, so the machine has at least that), --no-data (wheels only). PYTHON chooses the interpreter
# whose pip runs (default .venv/bin/python, else python3); pip's own configuration applies.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$ROOT/.gpu_kit"
PY_VERSION=3.12
PLATFORMS=()
WITH_DATA=1
MAX_MIB=${MAX_MIB:-48}
REQUIREMENTS="$ROOT/bin/gpu_kit_requirements.txt"
SHARED="${ZH_SHARED_DATA:-$ROOT/../shared/data}"
# tests/conftest.py's fixtures (google_vocab, clue_lines_file, clue_uer_file) and the bench's corpus + vocab
DATA_FILES=(google_zh_vocab.txt CLUECorpusSmall_sampled.txt CLUECorpusSmall_bert_sampled.txt README.md)

die() { echo "gpu_kit.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a folder"; KIT="$2"; shift 2 ;;
    --python-version) [ $# -ge 2 ] || die "--python-version needs X.Y"; PY_VERSION="$2"; shift 2 ;;
    --platform) [ $# -ge 2 ] || die "--platform needs a tag"; PLATFORMS+=("$2"); shift 2 ;;
    --no-data) WITH_DATA=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ "$PY_VERSION" =~ ^3\.[0-9]+$ ]] || die "--python-version $PY_VERSION: give MAJOR.MINOR, e.g. 3.12"
if [ ${#PLATFORMS[@]} -eq 0 ]; then
  for minor in $(seq 28 -1 17); do PLATFORMS+=("manylinux_2_${minor}_x86_64"); done
  PLATFORMS+=(manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64)
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
[ -f "$REQUIREMENTS" ] || die "$REQUIREMENTS is missing"

# The requirement lines, comments and blanks dropped; each must pin one version.
mapfile -t REQS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$REQUIREMENTS" | grep -v '^$')
for req in "${REQS[@]}"; do
  [[ "$req" =~ ^[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+$ ]] || die "$REQUIREMENTS: '$req' must be NAME==VERSION"
done
DEEPSPEED=""
OTHERS=()
for req in "${REQS[@]}"; do
  if [[ "${req,,}" == deepspeed==* ]]; then DEEPSPEED="$req"; else OTHERS+=("$req"); fi
done
[ -n "$DEEPSPEED" ] || die "$REQUIREMENTS names no deepspeed==VERSION"

mkdir -p "$KIT"
NEW="$KIT/.wheels.partial"
rm -rf "$NEW"
mkdir -p "$NEW"
trap 'rm -rf "$NEW"' EXIT

# deepspeed: the sdist built once (pure Python, so one wheel for every interpreter), reused after that.
ds_version="${DEEPSPEED#*==}"
ds_wheel=$(find "$KIT/wheels" -maxdepth 1 -name "deepspeed-${ds_version}-py3-none-any.whl" 2>/dev/null | head -n 1 || true)
if [ -n "$ds_wheel" ]; then
  cp "$ds_wheel" "$NEW/"
else
  echo "gpu_kit.sh: building $DEEPSPEED (pip wheel --no-deps)"
  "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$NEW" "$DEEPSPEED"
fi
[ -f "$NEW/deepspeed-${ds_version}-py3-none-any.whl" ] \
  || die "pip wheel $DEEPSPEED did not give deepspeed-${ds_version}-py3-none-any.whl: $(ls "$NEW")"

# Everything else as released wheels for the target (pip's cache makes a second run quick; an earlier
# kit's wheels may be for another interpreter, so they are not reused).
platform_args=()
for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
echo "gpu_kit.sh: downloading ${#OTHERS[@]} wheels for CPython $PY_VERSION (${PLATFORMS[0]} ... ${PLATFORMS[-1]})"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$PY_VERSION" "${platform_args[@]}" --dest "$NEW" "${OTHERS[@]}"

# Exactly one wheel per requirement, of the pinned version (names compared as pip normalizes them).
normalize() { tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'; }
for req in "${REQS[@]}"; do
  name=$(printf '%s' "${req%%==*}" | normalize)
  version="${req#*==}"
  found=0
  for wheel in "$NEW"/*.whl; do
    base=$(basename "$wheel")
    wheel_name=$(printf '%s' "${base%%-*}" | normalize)
    rest="${base#*-}"
    if [ "$wheel_name" = "$name" ]; then
      if [ "${rest%%-*}" = "$version" ]; then found=$((found + 1)); else rm -f "$wheel"; fi  # an older pin's
    fi
  done
  [ "$found" -eq 1 ] || die "$req: $found wheels for it in the kit (want 1)"
done
n_wheels=$(find "$NEW" -maxdepth 1 -name '*.whl' | wc -l)
[ "$n_wheels" -eq ${#REQS[@]} ] || die "$n_wheels wheels for ${#REQS[@]} requirements: $(ls "$NEW")"
rm -rf "$KIT/wheels"
mv "$NEW" "$KIT/wheels"
trap - EXIT
cp "$REQUIREMENTS" "$KIT/requirements.txt"

if [ "$WITH_DATA" = 1 ]; then
  mkdir -p "$KIT/data"
  for name in "${DATA_FILES[@]}"; do
    [ -f "$SHARED/$name" ] || die "$SHARED/$name is missing (set ZH_SHARED_DATA to the folder that holds it)"
    cmp -s "$SHARED/$name" "$KIT/data/$name" || install -m 0644 "$SHARED/$name" "$KIT/data/$name"
  done
else
  rm -rf "$KIT/data"
fi

{
  echo "python_version=$PY_VERSION"
  echo "platforms=${PLATFORMS[*]}"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) by $("$PYTHON" -m pip --version | cut -d' ' -f1-2)"
  listed=(wheels requirements.txt)
  [ "$WITH_DATA" = 1 ] && listed+=(data)
  (cd "$KIT" && find "${listed[@]}" -type f | LC_ALL=C sort | while read -r file; do
    echo "$(sha256sum "$file" | cut -d' ' -f1) $(stat -c %s "$file") $file"
  done)
} > "$KIT/kit.txt.partial"
mv "$KIT/kit.txt.partial" "$KIT/kit.txt"

bytes=$(du -sb "$KIT" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
data_note=""
[ "$WITH_DATA" = 1 ] && data_note=", ${#DATA_FILES[@]} data files"
echo "gpu_kit.sh: $KIT: $n_wheels wheels for CPython $PY_VERSION$data_note, $mib MiB in all"
[ "$bytes" -le $((MAX_MIB * 1048576)) ] \
  || die "the kit is $mib MiB, over $MAX_MIB MiB (the device tool carries 64 MiB at most, the working tree included)"
