# shellcheck shell=bash
# slurm/common.sh -- sourced by the job scripts in slurm/ (llama7b.sh, llama30b.sh, local_cpu.sh); not a job itself.
#
# It keeps the job scripts down to "#SBATCH header + what to train + one srun line" by doing the rest:
#   1. find the checkout (the directory you ran sbatch from, or $EMOE_ROOT) and its .venv
#   2. derive the rendezvous from the allocation (node/GPU counts are set ONLY in the #SBATCH header or on the sbatch
#      command line): NNODES, NPROC_PER_NODE, MASTER_ADDR (first node), MASTER_PORT (from the job id)
#   3. NCCL / torch.distributed knobs, each with a default and each overridable from the environment
#   4. emoe_snapshot     the run snapshot: batch script, sbatch/scontrol view of the job, git revision + diff,
#                        environment, resolved recipe + DeepSpeed config -> $OUTPUT_DIR/run/slurm/<jobid>.<attempt>/
#      emoe_convert      dense -> EMoE conversion with the recipe's emoe: settings, skipped when DST already is
#                        that conversion and verifies
#      emoe_run          runs the srun line in the background (so signal traps fire at once) and decides afterwards:
#                        finished / checkpointed-and-requeued / failed
#
# Preemption and time limits (the #SBATCH --signal=B:USR1@<s> --requeue lines of the job scripts):
#   Slurm sends SIGUSR1 to this batch shell <s> seconds before the time limit (or when you run
#   `scancel --batch --signal=USR1 <jobid>`). The trap below touches $OUTPUT_DIR/STOP; train.py polls that file at
#   every optimizer step, all ranks agree, save a checkpoint and exit 0 (torchrun does not forward SIGUSR1, a file on
#   the shared output dir reaches every node). When srun has returned and COMPLETED is missing, emoe_run calls
#   `scontrol requeue $SLURM_JOB_ID`: the same job id starts again later (SLURM_RESTART_COUNT=1, 2, ...), runs this
#   same script with the same arguments, skips the conversion, and train.py (resume=auto) continues from the newest
#   checkpoint. `touch $OUTPUT_DIR/STOP` by hand stops the run cleanly WITHOUT requeueing it.

emoe_log() { echo "[emoe-slurm $(date -u +%H:%M:%S)] $*"; }
emoe_die() {
  emoe_log "ERROR: $*" >&2
  # an OUTPUT_DIR this attempt created and left empty goes again (rmdir removes nothing that holds a file)
  if [ -n "${_EMOE_MADE_OUTPUT_DIR:-}" ]; then rmdir "$OUTPUT_DIR/run" "$OUTPUT_DIR" 2>/dev/null || true; fi
  exit 2
}

# ---- preemption trap: installed first, so a signal during conversion is remembered instead of killing the shell
EMOE_STOP_SIGNAL=""
_emoe_on_signal() {
  EMOE_STOP_SIGNAL=$1
  emoe_log "got SIG$1: asking every rank to checkpoint at the next step boundary ($OUTPUT_DIR/STOP)"
  mkdir -p "$OUTPUT_DIR" && echo "SIG$1 job ${SLURM_JOB_ID:-?} attempt ${SLURM_RESTART_COUNT:-0}" > "$OUTPUT_DIR/STOP"
}
trap '_emoe_on_signal USR1' USR1
# SIGTERM comes with scancel or with preemption by a higher-priority job; checkpoint if the grace time allows, but
# never requeue on it (a cancelled job must stay cancelled; PreemptMode=REQUEUE requeues by itself).
trap '_emoe_on_signal TERM' TERM

# ---- 1. the checkout and its python
[ -n "${SLURM_JOB_ID:-}" ] || emoe_die "not inside a Slurm job: submit it, e.g. 'sbatch slurm/llama7b.sh'"
: "${OUTPUT_DIR:?set OUTPUT_DIR before sourcing slurm/common.sh}"
EMOE_ROOT=${EMOE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$EMOE_ROOT/train.py" ] ||
  emoe_die "$EMOE_ROOT is not an emoe-llm checkout (no train.py): run sbatch from the repo root, or set EMOE_ROOT"
cd "$EMOE_ROOT" || emoe_die "cannot cd to $EMOE_ROOT"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
PYTHON=${PYTHON:-python}
command -v emoe-llm >/dev/null ||
  emoe_die "emoe-llm is not on PATH: 'make setup' in $EMOE_ROOT, or activate the environment before sbatch"
case $OUTPUT_DIR in /*) ;; *) OUTPUT_DIR=$EMOE_ROOT/$OUTPUT_DIR ;; esac  # every node must see the same path
# A mistyped RECIPE / DS_CONFIG would otherwise surface only after the conversion (an hour on 30B): fail now.
for _v in RECIPE DS_CONFIG; do
  if [ -n "${!_v:-}" ] && [ ! -f "${!_v}" ]; then
    emoe_die "$_v=${!_v}: file not found (relative paths resolve against $EMOE_ROOT)"
  fi
done
[ -d "$OUTPUT_DIR" ] || _EMOE_MADE_OUTPUT_DIR=1
mkdir -p "$OUTPUT_DIR/run"

# ---- 2. rendezvous, all derived from the allocation
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
_gpus=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}      # --gpus-per-node=8 or =a100:8 (type prefix dropped)
_gpus=${_gpus##*:}
if [ -z "$_gpus" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then   # --gres=gpu:8 -> SLURM_JOB_GPUS=0,1,...,7
  _gpus=$(tr ',' '\n' <<< "$SLURM_JOB_GPUS" | grep -c .)
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-${_gpus:-1}}              # training processes per node (1 per GPU)
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
# Below the Linux ephemeral range (32768+), distinct per job so jobs sharing a node do not collide.
MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
WORLD_SIZE=$((NNODES * NPROC_PER_NODE))
export EMOE_ROOT OUTPUT_DIR PYTHON NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT
# CPUs for the one task per node (srun does not inherit --cpus-per-task on every Slurm version; with --exclusive
# and no --cpus-per-task the task gets all CPUs of the node)
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$NPROC_PER_NODE}}
export CPUS_PER_NODE
# CPU threads per training process (torchrun would otherwise force 1)
_threads=$((CPUS_PER_NODE / NPROC_PER_NODE)); [ "$_threads" -ge 1 ] || _threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$_threads}

# ---- 3. NCCL / torch.distributed knobs (defaults; override any of them: export NAME=value before sbatch, or
#         sbatch --export=ALL,NAME=value)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}          # INFO to see transports/rings when debugging a hang or slow start;
                                               # add NCCL_DEBUG_SUBSYS=INIT,NET to keep it readable
# Network interface for NCCL's bootstrap/socket transport (and gloo). Unset = auto-detect, which on nodes with
# several NICs (ib0, eth0, docker0, ...) can pick the wrong one and hang at init: e.g. NCCL_SOCKET_IFNAME=ib0, or
# "^lo,docker" to exclude. GLOO_SOCKET_IFNAME follows it unless set.
if [ -n "${NCCL_SOCKET_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}
fi
# InfiniBand / RoCE, passed through when set: NCCL_IB_HCA=mlx5_0,mlx5_1 (which HCAs), NCCL_IB_GID_INDEX=3 (RoCE v2
# on many clusters; a wrong GID index is a classic multi-node hang), NCCL_IB_DISABLE=1 (TCP sockets only),
# NCCL_IB_TIMEOUT / NCCL_IB_RETRY_CNT (flaky fabrics).
for _v in NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_IB_DISABLE NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_NET_GDR_LEVEL; do
  if [ -n "${!_v:-}" ]; then export "${_v?}"; fi
done
# The collective timeout is the recipe's train.dist_timeout_minutes (default 60; pass train.dist_timeout_minutes=N
# as an override): the recipe hands it to deepspeed.init_distributed, so no environment variable changes it.
# On a collective timeout, dump the NCCL flight recorder (which collective each rank was in) next to the run.
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$OUTPUT_DIR/run/nccl_trace_rank_}
# Fewer fragmentation OOMs with ZeRO-3's gather/free pattern.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Compute nodes usually have no internet: model and tokenizer are local paths, so never wait on the Hub.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

emoe_log "job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) [${SLURM_JOB_NODELIST:-}] x $NPROC_PER_NODE" \
  "proc(s) = $WORLD_SIZE ranks; rendezvous $MASTER_ADDR:$MASTER_PORT; output $OUTPUT_DIR"

# ---- 4. helpers

# emoe_snapshot RECIPE DS_CONFIG OVERRIDE...  -- what this attempt ran, under run/slurm/<jobid>.<attempt>/; also
# validates the recipe + DeepSpeed config for this world size before any node starts (a typo fails in seconds).
emoe_snapshot() {
  local recipe=$1 ds=$2; shift 2
  local d=$OUTPUT_DIR/run/slurm/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
  mkdir -p "$d"
  scontrol write batch_script "$SLURM_JOB_ID" "$d/batch_script.sh" >/dev/null 2>&1 ||
    emoe_log "warning: scontrol write batch_script failed (not the job owner?)"
  scontrol show job -d "$SLURM_JOB_ID" > "$d/job.txt" 2>&1 || true
  {
    printf 'train.py overrides:'; printf ' %q' "$@"; echo
    echo "nodes: $SLURM_JOB_NODELIST ($NNODES) x $NPROC_PER_NODE processes; world size $WORLD_SIZE"
    echo "rendezvous: $MASTER_ADDR:$MASTER_PORT; batch host $(hostname)"
  } > "$d/launch.txt"
  # the job's log (#SBATCH --output), linked so it is found from the run dir
  local log; log=$(sed -n 's/^ *StdOut=//p' "$d/job.txt")
  [ -n "$log" ] && ln -sfn "$log" "$d/slurm.out"
  if git -C "$EMOE_ROOT" rev-parse HEAD > "$d/git.txt" 2>/dev/null; then
    git -C "$EMOE_ROOT" status --porcelain >> "$d/git.txt"
    git -C "$EMOE_ROOT" diff HEAD > "$d/git.diff"
  else
    echo "not a git checkout" > "$d/git.txt"
  fi
  # environment minus anything that looks like a secret
  env | sort | grep -Eiv '^[^=]*(token|secret|passw|api_?key|credential|private)[^=]*=' > "$d/env.txt" || true
  if ! "$PYTHON" - "$recipe" "$ds" "$WORLD_SIZE" "$d" "$@" <<'EOF'
import json, sys
from emoe_llm.train.config import (ConfigError, check_runnable, dump_config, fill_ds_config, load_config,
                                   load_ds_config)
recipe, ds, world, out, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
try:
    cfg = load_config(recipe, overrides)
    check_runnable(cfg)
    filled = fill_ds_config(load_ds_config(ds), cfg, world_size=world)
except (ConfigError, FileNotFoundError) as e:  # one line, printed by emoe_die
    open(f"{out}/resolve_error.txt", "w").write(" ".join(f"{recipe} + {ds} with {overrides}: {e}".split()))
    sys.exit(2)
open(f"{out}/config.yaml", "w").write(dump_config(cfg))
open(f"{out}/ds_config.json", "w").write(json.dumps(filled, indent=2) + "\n")
EOF
  then
    emoe_die "$(cat "$d/resolve_error.txt" 2>/dev/null || echo "the recipe does not resolve (see above)")"
  fi
  emoe_log "run snapshot: $d"
  emoe_preflight "$recipe" "$ds" "$@"
}

# emoe_preflight RECIPE DS_CONFIG OVERRIDE...  -- `emoe-llm plan` for this allocation (nodes x GPUs x the smallest
# GPU's memory): stops the job with one message when it cannot fit, before any node loads the model. PLAN_ARGS adds
# plan options (e.g. "--gpu h100-80gb --mfu 0.45"); PREFLIGHT=0 skips it. CPU-only allocations are not checked.
emoe_preflight() {
  local recipe=$1 ds=$2; shift 2
  [ "${PREFLIGHT:-1}" != 0 ] || return 0
  local mem rc=0 out=$OUTPUT_DIR/run/plan.txt plan_args=()
  command -v nvidia-smi >/dev/null || { emoe_log "preflight skipped: no GPU on the batch host"; return 0; }
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sort -n | head -n 1) || true
  [ -n "$mem" ] || { emoe_log "preflight skipped: nvidia-smi reports no GPU"; return 0; }
  read -r -a plan_args <<< "${PLAN_ARGS:-}"
  emoe-llm plan --config "$recipe" --ds-config "$ds" --nodes "$NNODES" --gpus-per-node "$NPROC_PER_NODE" \
    --gpu-mem-gb "$((mem / 1024))" "${plan_args[@]}" "$@" > "$out" 2>&1 || rc=$?
  case $rc in
    0) emoe_log "preflight: fits ($(grep -m1 '  total' "$out" | tr -s ' ') per GPU; plan: $out)" ;;
    1) cat "$out" >&2
       emoe_die "preflight: this job does not fit on $NNODES node(s) x $NPROC_PER_NODE GPU(s) of $((mem / 1024)) GiB:" \
         "$(tail -n 1 "$out") (plan: $out; PREFLIGHT=0 runs it anyway)" ;;
    *) emoe_log "warning: preflight could not plan this job (see $out); continuing" ;;
  esac
}

# emoe_convert SRC DST [recipe overrides...]  -- make DST the conversion of SRC that $RECIPE's emoe: section asks for
# (`emoe-llm convert --config`, the one conversion entry point). Only N, the permuted layers, the clustering seed and
# method key it: DST is kept when it already is that conversion and verifies (another top_k or a subset of the
# layers never re-clusters); otherwise converted again, resuming what an interrupted attempt left. CONVERT_ARGS
# (e.g. "--device cuda --skip-copied") go to `emoe-llm convert`.
emoe_convert() {
  local src=$1 dst=$2; shift 2
  : "${RECIPE:?set RECIPE (the recipe whose emoe: section says what to convert) before emoe_convert}"
  local convert_args=(); read -r -a convert_args <<< "${CONVERT_ARGS:-}"
  if [ -z "$src" ]; then   # converted elsewhere and the dense source is not on this cluster
    [ -f "$dst/config.json" ] || emoe_die "set MODEL=/path/to/the/dense/hf/checkpoint (or EMOE_MODEL to a converted one)"
    emoe_log "MODEL not set: training $dst as it is (not verified)"
    return 0
  fi
  # MODEL may be a Hub id (org/name; MODEL_REVISION pins a commit): `emoe-llm convert` fetches it into the HF cache
  # ($HF_HOME; with HF_HUB_OFFLINE=1 a compute node without internet reads only that cache)
  if [ ! -f "$src/config.json" ] && [[ ! "$src" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
    emoe_die "MODEL=$src is neither an HF checkpoint dir (no config.json) nor a Hub id (org/name)"
  fi
  [ -n "${MODEL_REVISION:-}" ] && convert_args+=(--revision "$MODEL_REVISION")
  local mode=--resume   # picks up a conversion an earlier attempt left half done
  [ -f "$dst/config.json" ] && mode=--overwrite   # replaced only when it is another (or a broken) conversion
  emoe-llm convert "$src" "$dst" "$@" --config "$RECIPE" --verify --quiet "$mode" "${convert_args[@]}" ||
    emoe_die "conversion of $src -> $dst failed (above)"
}

_emoe_newest_ckpt() {
  [ -d "$OUTPUT_DIR/checkpoints" ] || return 0
  find "$OUTPUT_DIR/checkpoints" -maxdepth 1 -name 'step_*' | sort | tail -n 1
}

# emoe_run srun ...  -- the training step, then: COMPLETED -> exit 0; SIGUSR1 seen -> requeue; failure -> exit rc.
emoe_run() {
  local rc=0 before after
  if [ "$EMOE_STOP_SIGNAL" = USR1 ]; then
    emoe_log "stop requested before training started: requeueing"
    _emoe_requeue
  fi
  before=$(_emoe_newest_ckpt)
  emoe_log "launch: $*"
  "$@" &
  local pid=$!
  while :; do   # `wait` returns early (>128) whenever a trapped signal arrives; srun keeps running
    rc=0; wait "$pid" || rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ -f "$OUTPUT_DIR/COMPLETED" ]; then
    rm -f "$OUTPUT_DIR/STOP"
    emoe_log "training complete: $(cat "$OUTPUT_DIR/COMPLETED")"
    return 0
  fi
  # `scancel --signal=USR1 <jobid>` without --batch reaches the ranks, not this shell: they checkpoint and exit 0,
  # and rank 0 logs it as the last metrics record. Treat it like the batch-shell signal.
  if [ -z "$EMOE_STOP_SIGNAL" ] && [ "$rc" -eq 0 ] && [ -f "$OUTPUT_DIR/metrics.jsonl" ] &&
     tail -n 1 "$OUTPUT_DIR/metrics.jsonl" | grep '"event": "preempted"' | grep -q '"reason": "SIGUSR1"'; then
    emoe_log "the training processes got SIGUSR1 (scancel --signal=USR1 to the job steps)"
    EMOE_STOP_SIGNAL=USR1
  fi
  if [ "$EMOE_STOP_SIGNAL" = USR1 ]; then
    after=$(_emoe_newest_ckpt)
    [ "$rc" -eq 0 ] || emoe_log "warning: the training step exited with $rc after the stop request"
    if [ -z "$after" ] || [ "$after" = "$before" ]; then
      emoe_die "stopped without a new checkpoint (newest: ${after:-none}); not requeueing a job that makes no progress"
    fi
    emoe_log "checkpoint $after written; requeueing job $SLURM_JOB_ID"
    _emoe_requeue
  fi
  if [ "$rc" -ne 0 ]; then
    emoe_log "ERROR: training failed (exit $rc); see the log above and $OUTPUT_DIR/run/. Fix it and sbatch the same" \
      "command again: it resumes from $(_emoe_newest_ckpt)"
    exit "$rc"
  fi
  emoe_log "training stopped before the end (${EMOE_STOP_SIGNAL:+SIG$EMOE_STOP_SIGNAL, }STOP file or a signal to the" \
    "job steps) and is not requeued; submit the same command again to resume from $(_emoe_newest_ckpt)"
}

_emoe_requeue() {
  local max=${MAX_REQUEUES:-50}
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$max" ]; then
    emoe_die "already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=$max): not requeueing again"
  fi
  scontrol requeue "$SLURM_JOB_ID" || emoe_die "scontrol requeue failed: resubmit the same command to resume"
  # Slurm now ends this attempt; the requeued one starts once the job is eligible again.
  exit 0
}
