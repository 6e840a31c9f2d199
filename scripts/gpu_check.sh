#!/usr/bin/env bash
# The prepared GPU check (issue #15): one script, one H200, under 8 minutes. On a CUDA machine it installs the carried
# wheels (deepspeed, datasets, bitsandbytes + deps: `make gpu-wheels`) into a temp site dir, with no registry access,
# then runs four steps, each under its own time cap, writing JSON into RESULTS_DIR:
#   1. pytest -m gpu                       -> pytest_gpu.json     (bf16 ZeRO-3 recipe runs, bf16 vs fp32, clustering, QLoRA)
#   2. step_overhead.py --preset 7b-slice  -> step_overhead.json  (EMoE/dense step at Llama-2-7B widths, bf16)
#   3. train_throughput.py, 1B widths      -> train_throughput.json (ZeRO-3, 1 GPU: tokens/s and MFU, dense and EMoE)
#   4. clustering.py on CUDA, 30B width    -> clustering.json     (seconds per 17920x6656 layer, N=256)
# plus env.json (GPU, versions), summary.json (every step's command, cap, exit status, seconds, headline figures)
# and logs.tar.gz (each step's full output): 7 files, few enough to copy back from a remote GPU box in one go.
#
#   scripts/gpu_check.sh RESULTS_DIR [--wheels DIR]          # on the GPU machine (default wheels: .whl)
#   scripts/gpu_check.sh RESULTS_DIR --dry-run [--tiny]      # on CPU: check the wheels and every step's command line
#
# --dry-run: checks the wheels (one of each, valid zips, tags that install on CPython 3.12 manylinux x86_64, every
# dependency carried or in the device image, the 64 MiB travel limit), installs them into a temp dir exactly as on
# the device (pip --target, --no-index, with the device's platform tags), collects the gpu tests, and parses every
# benchmark's GPU command line (--print-config). --tiny also runs every step at a tiny CPU size through the same
# JSON + summary path. Environment: PYTHON (interpreter; default python3, or .venv/bin/python in a dry run),
# PEAK_TFLOPS and MEASURED_PEAK_TFLOPS (override the table below). gpu-marked tests include packed FlashAttention-2
# rows when flash-attn imports (a carried flash-attn wheel), and skip them otherwise.
#
# Peak dense bf16 TFLOP/s, per card (MFU is reported against the datasheet figure, and also against the measured
# matmul rate where one exists for the card):
#   card       datasheet   measured (8192^3 bf16 matmul)
#   H100 SXM   989         none yet (MFU against the datasheet only)
#   H200       989         790 (measured on an H200)
set -uo pipefail

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
REPO=$(cd "${GPU_CHECK_REPO:-$(dirname "$0")/..}" && pwd)  # GPU_CHECK_REPO: for the dry-run's own test
RESULTS="" DRY=0 TINY=0 WHEELS="$REPO/.whl"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --tiny) TINY=1 ;;
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#--wheels=} ;;
    -h|--help) usage ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$RESULTS" ] || usage; RESULTS=$1 ;;
  esac
  shift
done
[ -n "$RESULTS" ] || usage
if [ "$TINY" = 1 ] && [ "$DRY" = 0 ]; then echo "gpu_check.sh: --tiny goes with --dry-run" >&2; exit 2; fi
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd) || exit 2
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
LOGS="$RESULTS/logs"
rm -rf "$LOGS" && mkdir -p "$LOGS"
if [ "$DRY" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PY=${PYTHON:-$REPO/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
PEAK=${PEAK_TFLOPS:-989}  # H100 SXM and H200 alike (the table above)
# the measured rate belongs to the H200; on another card there is none (the dry run, on CPU, uses the H200's)
GPU_NAME=$([ "$DRY" = 1 ] || "$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)
case "${GPU_NAME:-H200 (dry run)}" in
  *H200*) MEASURED_PEAK=${MEASURED_PEAK_TFLOPS:-790} ;;
  *) MEASURED_PEAK=${MEASURED_PEAK_TFLOPS:-} ;;
esac
cd "$REPO" || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FAILED=0

say() { printf '[gpu_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# record NAME CAP RC NANOSECONDS CMD...: one line of steps.jsonl
record() {
  "$PY" -c 'import json, sys; n, cap, rc, ns = sys.argv[1:5]
print(json.dumps({"name": n, "cap": int(cap), "rc": int(rc), "seconds": round(int(ns) / 1e9, 1), "command": sys.argv[5:]}))' \
    "$@" >>"$LOGS/steps.jsonl"
}

# run_step NAME CAP CMD...: run under `timeout`, full output to logs/NAME.log, last lines to the console
run_step() {
  local name=$1 cap=$2 t0 rc
  shift 2
  say "step $name (cap ${cap}s): $*"
  t0=$(date +%s%N)
  timeout -k 15 "$cap" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  record "$name" "$cap" "$rc" "$(( $(date +%s%N) - t0 ))" "$@"
  tail -n 4 "$LOGS/$name.log" | sed "s/^/    $name| /"
  if [ "$rc" != 0 ]; then
    FAILED=1
    say "step $name FAILED (exit $rc$( [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ", over its ${cap}s cap")); last lines:"
    tail -n 40 "$LOGS/$name.log" | sed "s/^/    $name! /"
  fi
  return "$rc"
}

# ---- the four steps' command lines (GPU sizes)
PYTEST=("$PY" -m pytest -m gpu tests --continue-on-collection-errors -p no:cacheprovider -v -rA
        --junitxml "$LOGS/pytest_gpu.xml")
STEP_OVERHEAD=("$PY" benchmarks/step_overhead.py --preset 7b-slice --device cuda --rounds 9 --steps 3 --warmup 1
               --micro-rounds 15 --json "$RESULTS/step_overhead.json")
TRAIN=("$PY" benchmarks/train_throughput.py --preset llama-3.2-1b --layers 16 --seq 2048 --micro-batch 4
       --dtype bfloat16 --rounds 5 --steps 5 --warmup 2 --peak-tflops "$PEAK"
       ${MEASURED_PEAK:+--extra-peak-tflops "$MEASURED_PEAK"} --json "$RESULTS/train_throughput.json")
CLUSTER=("$PY" benchmarks/clustering.py --shapes 30b --cases "random,structured" --devices cuda --no-sklearn --no-kmc
         --n-init 3 --max-iter 30 --json "$RESULTS/clustering.json")
# caps: ~20 (install) + 180 + 90 + 110 + 60 = 460 s < 8 min, so a rerun fits in a 15-minute device budget
CAP_PYTEST=180 CAP_STEP=90 CAP_TRAIN=110 CAP_CLUSTER=60

pip_install() {  # pip_install TARGET [extra pip args]: the carried wheels, no registry, no dependency resolution
  local target=$1
  shift
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$target" "$@" "$WHEELS"/*.whl
}

if [ "$DRY" = 1 ]; then
  say "DRY RUN on $(uname -m), python $("$PY" -c 'import platform; print(platform.python_version())')"
  say "wheels in $WHEELS"
  if [ ! -d "$WHEELS" ]; then  # nothing to check the install or the steps against: say so now, not after them
    "$PY" scripts/gpu_wheels.py check "$WHEELS"
    rm -rf "$LOGS"
    say "dry run FAILED"
    exit 1
  fi
  "$PY" scripts/gpu_wheels.py check "$WHEELS" || { say "wheel check FAILED"; FAILED=1; }
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
  plats=()
  for n in $(seq 5 39); do plats+=(--platform "manylinux_2_${n}_x86_64"); done
  if pip_install "$site" --python-version 3.12 --implementation cp --only-binary=:all: "${plats[@]}" \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 >"$LOGS/install.log" 2>&1; then
    say "wheels install as on the device (pip --target, cp312 manylinux x86_64): $(find "$site" -maxdepth 1 -name '*.dist-info' | wc -l) distributions"
  else
    say "wheel install FAILED:"; sed 's/^/    /' "$LOGS/install.log"; FAILED=1
  fi
  rm -rf "$site"
  say "step pytest_gpu (cap ${CAP_PYTEST}s): ${PYTEST[*]}"
  if "${PYTEST[@]:0:6}" --collect-only -q -p no:cacheprovider >"$LOGS/collect.log" 2>&1; then
    n=$(grep -c '::' "$LOGS/collect.log")
    say "  collects $n gpu-marked tests"
    [ "$n" -gt 0 ] || { say "  no gpu tests collected"; FAILED=1; }
  else
    say "  pytest collection FAILED:"; tail -n 30 "$LOGS/collect.log" | sed 's/^/    /'; FAILED=1
  fi
  for step in step_overhead:STEP_OVERHEAD train_throughput:TRAIN clustering:CLUSTER; do
    declare -n cmd=${step#*:}
    say "step ${step%%:*}: ${cmd[*]}"
    if out=$("${cmd[@]}" --print-config 2>&1); then
      say "  parses: $out"
    else
      say "  command line BROKEN:"; echo "$out" | tail -n 15 | sed 's/^/    /'; FAILED=1
    fi
    unset -n cmd
  done
  if [ "$TINY" = 1 ]; then  # the same steps at a tiny CPU size, through the JSON + summary path
    export CUDA_VISIBLE_DEVICES=""
    "$PY" scripts/gpu_check_report.py env "$RESULTS/env.json" || FAILED=1
    run_step pytest_gpu 300 "${PYTEST[@]}"  # on CPU every gpu test is collected and skipped
    "$PY" scripts/gpu_check_report.py junit "$LOGS/pytest_gpu.xml" "$RESULTS/pytest_gpu.json" || FAILED=1
    run_step step_overhead 300 "$PY" benchmarks/step_overhead.py --device cpu --hidden 64 --ffn 256 --layers 4 \
      --heads 4 --kv-heads 2 --vocab 128 --seq 16 --rounds 2 --steps 1 --micro-rounds 2 --micro-reps 1 \
      --json "$RESULTS/step_overhead.json"
    run_step train_throughput 300 "$PY" benchmarks/train_throughput.py --preset tiny --layers 2 --seq 16 --rounds 1 \
      --steps 1 --warmup 1 --experts 8 --top-k 2 --peak-tflops "$PEAK" --extra-peak-tflops "$MEASURED_PEAK" \
      --json "$RESULTS/train_throughput.json"
    run_step clustering 300 "$PY" benchmarks/clustering.py --shapes tiny --cases random,structured --devices cpu \
      --no-sklearn --no-kmc --n-init 1 --max-iter 5 --json "$RESULTS/clustering.json"
    "$PY" scripts/gpu_check_report.py summary "$RESULTS" || FAILED=1
  fi
  tar -czf "$RESULTS/logs.tar.gz" -C "$RESULTS" logs && rm -rf "$LOGS"
  say "dry run $([ "$FAILED" = 0 ] && echo ok || echo FAILED)"
  exit "$FAILED"
fi

# ---- on the GPU machine
T0=$(date +%s)
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: $PY sees no CUDA device; on a CPU machine use --dry-run" >&2
  exit 2
fi
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || true
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
say "installing $(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) wheels from $WHEELS into $SITE"
"$PY" scripts/gpu_wheels.py check "$WHEELS" --no-size-check >"$LOGS/install.log" 2>&1 || {
  cat "$LOGS/install.log"; say "wheel check failed: continuing with what the image has"; }
pip_install "$SITE" >>"$LOGS/install.log" 2>&1 \
  || { tail -n 20 "$LOGS/install.log"; say "wheel install FAILED: continuing with what the image has"; FAILED=1; }
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" DS_ACCELERATOR=cuda
"$PY" scripts/gpu_check_report.py env "$RESULTS/env.json" && cat "$RESULTS/env.json"

run_step pytest_gpu "$CAP_PYTEST" "${PYTEST[@]}"
[ -f "$LOGS/pytest_gpu.xml" ] && "$PY" scripts/gpu_check_report.py junit "$LOGS/pytest_gpu.xml" "$RESULTS/pytest_gpu.json"
run_step step_overhead "$CAP_STEP" "${STEP_OVERHEAD[@]}"
run_step train_throughput "$CAP_TRAIN" "${TRAIN[@]}"
run_step clustering "$CAP_CLUSTER" "${CLUSTER[@]}"

"$PY" scripts/gpu_check_report.py summary "$RESULTS" || FAILED=1
tar -czf "$RESULTS/logs.tar.gz" -C "$RESULTS" logs && rm -rf "$LOGS"
rm -rf "$SITE"
say "done in $(( $(date +%s) - T0 )) s; results in $RESULTS"
exit "$FAILED"
