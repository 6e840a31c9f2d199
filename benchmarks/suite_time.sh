#!/usr/bin/env bash
# How long `make test` takes on a clean clone: what CI runs (.ci/run), timed end to end, set-up included.
#
#   bash benchmarks/suite_time.sh            # clones HEAD of this checkout into a temp dir and times `bash .ci/run`
#   KEEP=1 bash benchmarks/suite_time.sh     # keep the clone (and its log) afterwards
#
# The clone gets a fresh HOME, so nothing cached by earlier runs helps it: pip's wheel cache, the DeepSpeed op build,
# the SmolLM2 fixture and the data cache are all built again. Prints the set-up time, each pytest pass's summary line,
# and the total last. Run it on an otherwise idle machine and say the load beside the figure: every other process on
# 2 cores lengthens it.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/emoe-suite-time.XXXXXX")
git clone -q "$SRC" "$WORK/emoe-llm"
mkdir "$WORK/home"
LOG="$WORK/ci.log"
echo "clean clone of $(git -C "$SRC" rev-parse --short HEAD) in $WORK; $(nproc) cores;" \
  "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
T0=$(date +%s)
rc=0
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}  # a pyenv python finds itself by it, not by the new HOME
(cd "$WORK/emoe-llm" && HOME="$WORK/home" PYENV_ROOT="$PYENV_ROOT" bash .ci/run) >"$LOG" 2>&1 || rc=$?
T1=$(date +%s)
grep -E "^(installed: |DeepSpeed CPU comm op)" "$LOG" || true
grep -E "^=+ .*(passed|failed|error).* in [0-9.]+s" "$LOG" || true
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
secs=$((T1 - T0))
echo "make test on a clean clone: exit $rc, $secs s ($((secs / 60)) min $((secs % 60)) s), set-up included"
if [ "${KEEP:-0}" = 1 ]; then echo "kept: $WORK"; else rm -rf "$WORK"; fi
exit "$rc"
