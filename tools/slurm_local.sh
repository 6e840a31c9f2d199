#!/usr/bin/env bash
# slurm_local.sh -- a real, throw-away Slurm cluster (slurmctld + N x slurmd [+ munged])
# on ONE Debian 12 machine, for tests/CI. Needs root. No systemd, no cgroups.
#
#   bash slurm_local.sh install          # apt-get install slurmctld slurmd slurm-client munge
#   bash slurm_local.sh start            # start daemons, wait until all nodes are idle
#   . "$SLURM_LOCAL_DIR/env.sh"          # exports SLURM_CONF for sbatch/srun/sinfo/...
#   bash slurm_local.sh stop             # scancel everything, stop daemons by their PIDs
#   bash slurm_local.sh status
#
# Knobs (environment):
#   SLURM_LOCAL_DIR=/tmp/slurm-local   everything (conf, state, spool, logs, pids, munge key/socket)
#   SLURM_LOCAL_NODES=1                1 -> NodeName=localhost; N>1 -> n1..nN (multiple-slurmd,
#                                      all on 127.0.0.1, one slurmd per node on its own port)
#   SLURM_LOCAL_CPUS=$(nproc)          CPUs per (emulated) node; may exceed real cores
#                                      (SlurmdParameters=config_overrides)
#   SLURM_LOCAL_AUTH=munge             munge | none   (auth/none + cred/none needs no munged)
#   SLURM_LOCAL_HOSTS=auto             how n1..nN become resolvable inside jobs (N>1 only):
#                                      unshare   : slurmds run in private mount + UTS namespaces: a
#                                                  hosts file bind-mounted on /etc/hosts and
#                                                  `hostname` set to the node name (n1, n2, ...)
#                                      etc-hosts : append "127.0.0.1 n1 .. nN" to /etc/hosts
#                                                  (removed again by stop)
#                                      off       : don't (jobs must use NodeAddr, not node names)
#                                      auto      : unshare if it works, else etc-hosts
#   SLURM_LOCAL_CTLD_PORT=6817  SLURM_LOCAL_SLURMD_PORT=6818 (node i uses SLURMD_PORT+i-1)
#   SLURM_LOCAL_MIN_JOB_AGE=5          MinJobAge; <=5 keeps sbatch --wait polling every 2 s
#   SLURM_LOCAL_CRED_EXPIRE=5          AuthInfo cred_expire: also how long a requeued job waits
#                                      before it may start again (Slurm's default is 120 s)
#   SLURM_LOCAL_SCHED_PARAMS=sched_interval=2,bf_interval=2   SchedulerParameters
set -euo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
NODES=${SLURM_LOCAL_NODES:-1}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
AUTH=${SLURM_LOCAL_AUTH:-munge}
HOSTS_MODE=${SLURM_LOCAL_HOSTS:-auto}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
# sbatch --wait polls at 2s, then x4 (8s, 32s) while poll < MinJobAge/2 -> with MinJobAge<=5 it
# polls every 2s (a 3s job returns after ~4s instead of ~10s). Finished jobs stay visible >=5s.
MIN_JOB_AGE=${SLURM_LOCAL_MIN_JOB_AGE:-5}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
# A requeued job may start again only after the credential lifetime (default 120 s); a short one
# lets requeue tests finish in seconds.
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-5}
# Pending jobs (e.g. a requeued one whose wait is over) are looked at every few seconds instead of every 30-60 s.
SCHED_PARAMS=${SLURM_LOCAL_SCHED_PARAMS:-sched_interval=2,bf_interval=2}
CONF=$D/etc/slurm.conf
MARK="# slurm-local:$D"

log() { echo "[slurm-local] $*" >&2; }

node_names() {
  if [ "$NODES" -le 1 ]; then echo localhost; else seq -f 'n%g' 1 "$NODES"; fi
}

do_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
     command -v sbatch >/dev/null && command -v munged >/dev/null; then
    log "already installed: $(slurmd -V)"; return 0
  fi
  # Keep postinst from trying to start system services (munge would otherwise be
  # started on /run/munge by its init script when no policy-rc.d exists).
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed: $(slurmd -V), $(munged -V 2>&1 | head -1)"
}

pid_alive() {   # running and not a zombie (our daemons are reparented to PID 1, which reaps lazily)
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null &&
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_pids() {    # SIGTERM all given pidfiles, wait up to 10 s, then SIGKILL survivors
  local f p pids=""
  for f in "$@"; do
    [ -f "$f" ] || continue
    p=$(cat "$f"); rm -f "$f"
    pid_alive "$p" && kill "$p" 2>/dev/null && pids="$pids $p"
  done
  for _ in $(seq 1 100); do
    local left=""
    for p in $pids; do pid_alive "$p" && left="$left $p"; done
    pids=$left; [ -z "$pids" ] && return 0; sleep 0.1
  done
  for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
}

write_conf() {
  local auth_lines
  if [ "$AUTH" = munge ]; then
    auth_lines="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=$CRED_EXPIRE"
  else
    auth_lines="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=$CRED_EXPIRE"
  fi
  cat > "$CONF" <<EOF
# generated by slurm_local.sh
ClusterName=localci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
$auth_lines
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=$SCHED_PARAMS
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=$MIN_JOB_AGE
MailProg=/bin/true
EOF
  if [ "$NODES" -le 1 ]; then
    echo "NodeName=localhost NodeAddr=127.0.0.1 Port=$SLURMD_PORT CPUs=$CPUS State=UNKNOWN" >> "$CONF"
  else
    local i
    for i in $(seq 1 "$NODES"); do
      echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i - 1)) CPUs=$CPUS State=UNKNOWN" >> "$CONF"
    done
  fi
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

start_munge() {
  install -d -o munge -g munge -m 0755 "$D/munge"      # socket dir must be o+x
  if [ ! -s "$D/munge/munge.key" ]; then
    setpriv --reuid=munge --regid=munge --init-groups mungekey --create --keyfile="$D/munge/munge.key" --force
  fi
  # setpriv execs, so $! is munged's own PID
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
    --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket.2" \
    --pid-file="$D/munge/munged.pid" --seed-file="$D/munge/munged.seed" \
    --log-file="$D/munge/munged.log" </dev/null >"$D/log/munged.out" 2>&1 &
  echo $! > "$D/run/munged.ci.pid"
  for _ in $(seq 1 50); do [ -S "$D/munge/munge.socket.2" ] && break; sleep 0.1; done
  munge -S "$D/munge/munge.socket.2" -n | unmunge -S "$D/munge/munge.socket.2" >/dev/null \
    || { cat "$D/log/munged.out" >&2; log "munged not working"; return 1; }
}

setup_hosts() {   # decide how n1..nN resolve; echoes the mode used
  [ "$NODES" -le 1 ] && { echo off; return; }
  local mode=$HOSTS_MODE
  if [ "$mode" = auto ]; then
    if unshare -m -u --propagation private true 2>/dev/null; then mode=unshare; else mode=etc-hosts; fi
  fi
  local names; names=$(node_names | tr '\n' ' ')
  case $mode in
    unshare)   { cat /etc/hosts; echo "127.0.0.1 $names"; } > "$D/etc/hosts" ;;
    etc-hosts) grep -qF "$MARK" /etc/hosts || echo "127.0.0.1 $names $MARK" >> /etc/hosts ;;
  esac
  echo "$mode"
}

do_start() {
  do_stop quiet || true
  rm -rf "$D/state" "$D/spool" "$D/log" "$D/run"
  mkdir -p "$D/etc" "$D/state" "$D/log" "$D/run"
  local n
  for n in $(node_names); do mkdir -p "$D/spool/$n"; done
  write_conf
  echo "export SLURM_CONF=$CONF" > "$D/env.sh"
  export SLURM_CONF=$CONF
  [ "$AUTH" = munge ] && start_munge

  /usr/sbin/slurmctld -D -i -f "$CONF" </dev/null >"$D/log/slurmctld.out" 2>&1 &
  echo $! > "$D/run/slurmctld.ci.pid"
  for _ in $(seq 1 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done

  local hosts_mode; hosts_mode=$(setup_hosts)
  echo "$hosts_mode" > "$D/run/hosts_mode"
  for n in $(node_names); do
    if [ "$hosts_mode" = unshare ]; then
      # bash execs slurmd, so $! is slurmd's PID
      # -u: own UTS namespace too, so `hostname` inside a job on node n2 says n2 (rank placement
      # can then be checked the way it would be on a real cluster)
      unshare -m -u --propagation private bash -c \
        "hostname '$n' && mount --bind '$D/etc/hosts' /etc/hosts && exec /usr/sbin/slurmd -D -f '$CONF' -N '$n'" \
        </dev/null >"$D/log/slurmd-$n.out" 2>&1 &
    else
      /usr/sbin/slurmd -D -f "$CONF" -N "$n" </dev/null >"$D/log/slurmd-$n.out" 2>&1 &
    fi
    echo $! > "$D/run/slurmd-$n.ci.pid"
  done

  local want=$NODES idle=0
  for _ in $(seq 1 300); do   # up to 30 s
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2=="idle"' | sort -u | wc -l)
    [ "$idle" -ge "$want" ] && break
    sleep 0.1
  done
  if [ "$idle" -lt "$want" ]; then
    log "nodes not idle after 30s:"; sinfo -N >&2 || true
    tail -n 20 "$D"/log/*.out >&2 || true
    return 1
  fi
  log "up: $NODES node(s) [$(node_names | tr '\n' ' ')], auth=$AUTH, hosts=$hosts_mode; SLURM_CONF=$CONF"
}

do_stop() {
  local quiet=${1:-}
  [ -d "$D/run" ] || return 0
  export SLURM_CONF=$CONF
  if [ -f "$D/run/slurmctld.ci.pid" ] && pid_alive "$(cat "$D/run/slurmctld.ci.pid")"; then
    # cancel every job first so that no slurmstepd / task outlives its slurmd
    squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  stop_pids "$D"/run/slurmd-*.ci.pid
  stop_pids "$D/run/slurmctld.ci.pid"
  stop_pids "$D/run/munged.ci.pid"
  if grep -qF "$MARK" /etc/hosts 2>/dev/null; then
    grep -vF "$MARK" /etc/hosts > "$D/hosts.restore" && cat "$D/hosts.restore" > /etc/hosts
  fi
  [ -n "$quiet" ] || log "stopped"
}

do_status() {
  export SLURM_CONF=$CONF
  local f
  for f in "$D"/run/*.ci.pid; do
    [ -f "$f" ] || continue
    printf '%-28s pid %-7s %s\n' "$(basename "$f" .ci.pid)" "$(cat "$f")" \
      "$(pid_alive "$(cat "$f")" && echo alive || echo DEAD)"
  done
  sinfo -N 2>&1 || true
}

case ${1:-} in
  install) do_install ;;
  start)   do_start ;;
  stop)    do_stop ;;
  status)  do_status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
