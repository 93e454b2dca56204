#!/usr/bin/env bash
# A private one-node Slurm cluster for tests: munged (as user munge), slurmctld and slurmd, all
# under one temporary folder, on free ports, with their own munge key and socket, so that it
# touches nothing of the machine's own Slurm or munge. Source this file, then:
#   slurm_cluster_start DIR    # exports SLURM_CONF; the daemons' pids go to SLURM_CLUSTER_PIDS
#   slurm_cluster_stop         # kills exactly those pids (safe to call twice, and from a trap)
# Needs root (slurmd starts jobs as their user) and the packages slurm-wlm and munge.

SLURM_CLUSTER_PIDS=()
SLURM_CLUSTER_DIR=""

_sc_log() { echo "slurm_cluster: $*" >&2; }

# A TCP port nothing listens on (bash's /dev/tcp connect fails on a free port).
_sc_free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

_sc_wait_for() {  # seconds, description, command...
  local seconds="$1" what="$2"
  shift 2
  local i
  for ((i = 0; i < seconds * 10; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  _sc_log "timed out after ${seconds}s waiting for $what"
  return 1
}

_sc_dump_logs() {
  local f
  for f in "$SLURM_CLUSTER_DIR"/log/*.log; do
    [[ -f "$f" ]] || continue
    echo "----- $f (last 30 lines)" >&2
    tail -n 30 "$f" >&2
  done
}

slurm_cluster_start() {
  local dir="$1"
  SLURM_CLUSTER_DIR="$dir"
  local host user
  host="$(hostname -s)"
  user="$(id -un)"
  for tool in munged mungekey slurmctld slurmd sbatch sinfo setpriv; do
    command -v "$tool" >/dev/null 2>&1 || {
      _sc_log "'$tool' not found: install the packages slurm-wlm and munge (tools/setup.sh)"
      return 1
    }
  done
  ((EUID == 0)) || { _sc_log "needs root (slurmd)"; return 1; }
  id munge >/dev/null 2>&1 || { _sc_log "no user 'munge' (apt-get install munge)"; return 1; }

  mkdir -p "$dir"/{munge,state,spool,log}
  # munged insists on a key and socket folder owned by its user, reachable by all, and on no
  # group/world-writable folder above them without the sticky bit.
  chmod 755 "$dir"
  chown munge:munge "$dir/munge"
  chmod 755 "$dir/munge"  # clients need to reach the socket
  # setpriv execs (no fork, unlike runuser or su): $! is munged's own pid.
  local as_munge=(setpriv --reuid=munge --regid=munge --init-groups)
  "${as_munge[@]}" mungekey --create --keyfile="$dir/munge/munge.key" || return 1
  local socket="$dir/munge/munge.socket"
  "${as_munge[@]}" munged --foreground --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed" >"$dir/log/munged.out" 2>&1 &
  SLURM_CLUSTER_PIDS+=($!)
  _sc_wait_for 20 "munged's socket" test -S "$socket" || { cat "$dir/munge/munged.log" >&2; return 1; }

  local ctld_port slurmd_port cpus
  ctld_port="$(_sc_free_port)" && slurmd_port="$(_sc_free_port)" || { _sc_log "no free port"; return 1; }
  while [[ "$slurmd_port" == "$ctld_port" ]]; do slurmd_port="$(_sc_free_port)"; done
  # nproc honours OMP_NUM_THREADS (Bazel's test environment sets it to 1).
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  cat >"$dir/slurm.conf" <<CONF
ClusterName=qtraintest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -D -c -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
  SLURM_CLUSTER_PIDS+=($!)
  slurmd -D -f "$SLURM_CONF" -N "$host" >"$dir/log/slurmd.out" 2>&1 &
  SLURM_CLUSTER_PIDS+=($!)
  if ! _sc_wait_for 60 "the node to become idle" \
      bash -c '[[ "$(sinfo -h -N -o %t 2>/dev/null)" == idle* ]]'; then
    sinfo -N -l >&2 || true
    _sc_dump_logs
    return 1
  fi
  _sc_log "up: $host, $cpus CPUs, slurmctld :$ctld_port, slurmd :$slurmd_port, pids ${SLURM_CLUSTER_PIDS[*]}"
}

slurm_cluster_stop() {
  local pid
  # Newest first: slurmd, slurmctld, then munged.
  for ((i = ${#SLURM_CLUSTER_PIDS[@]} - 1; i >= 0; i--)); do
    pid="${SLURM_CLUSTER_PIDS[$i]}"
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${SLURM_CLUSTER_PIDS[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SLURM_CLUSTER_PIDS=()
}
