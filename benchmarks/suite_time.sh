#!/usr/bin/env bash
# How long the tests take on a clean clone, as CI runs them (.ci/run): `make test` (set-up included: the README's
# figure), then `make test-slow`, each timed.
#
#   bash benchmarks/suite_time.sh            # clones HEAD of this checkout into a temp dir; times both tiers
#   SLOW=0 bash benchmarks/suite_time.sh     # `make test` only
#   KEEP=1 bash benchmarks/suite_time.sh     # keep the clone (and its logs) afterwards
#
# The clone gets a fresh HOME, so nothing cached by earlier runs helps it: pip's wheel cache, the DeepSpeed op build,
# the SmolLM2 fixture and the data cache are all built again. Prints the set-up line, each pytest summary line and
# the times. Run it on an otherwise idle machine and say the load beside the figure: every other process on 2 cores
# lengthens it.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/emoe-suite-time.XXXXXX")
git clone -q "$SRC" "$WORK/emoe-llm"
mkdir "$WORK/home"
echo "clean clone of $(git -C "$SRC" rev-parse --short HEAD) in $WORK; $(nproc) cores;" \
  "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}  # a pyenv python finds itself by it, not by the new HOME
export PIP_DISABLE_PIP_VERSION_CHECK=1

tier() {  # tier NAME: time `make NAME` in the clone, print its summary lines and seconds
  local log="$WORK/$1.log" t0 rc=0
  t0=$(date +%s)
  (cd "$WORK/emoe-llm" && HOME="$WORK/home" PYENV_ROOT="$PYENV_ROOT" make "$1" PYTEST_ARGS="-v --durations=25") \
    >"$log" 2>&1 || rc=$?
  local secs=$(($(date +%s) - t0))
  grep -E "^(installed: |DeepSpeed CPU comm op)" "$log" || true
  grep -E "^=+ .*(passed|failed|error).* in [0-9.]+s" "$log" || true
  echo "make $1 on a clean clone: exit $rc, $secs s ($((secs / 60)) min $((secs % 60)) s)," \
    "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
  return "$rc"
}

rc=0
tier test || rc=$?   # set-up included: the clone has no .venv yet
if [ "${SLOW:-1}" = 1 ]; then tier test-slow || { s=$?; [ "$rc" -ne 0 ] || rc=$s; }; fi
if [ "${KEEP:-0}" = 1 ]; then echo "kept: $WORK"; else rm -rf "$WORK"; fi
exit "$rc"
