#!/usr/bin/env bash
# Starts a data-parallel qtrain job as NP plain processes on this machine that meet through the
# parameter service (no MPI): each rank gets --coordinator, --rank and --world_size. Without
# PS_ADDRESS the script starts a private qtrain_ps for the job (storage in a temporary folder,
# a random token) and stops it, by its pid, when the job ends.
#
# Usage: launch/ps_local.sh [qtrain flags...]
#   NP=2 JOB=configs/tiny_cpu.textproto launch/ps_local.sh --steps=200
#   PS_ADDRESS=node1:7070 QTRAIN_PS_TOKEN_FILE=~/.qtrain_ps_token launch/ps_local.sh
# Every variable below can also be set in the environment. docs/launching.md explains them.
set -euo pipefail

# ---- edit here -------------------------------------------------------------------------------
NP="${NP:-2}"                                         # ranks on this machine
JOB="${JOB:-configs/tiny_cpu.textproto}"              # job spec (a file, or ps://JOB)
QTRAIN_BIN="${QTRAIN_BIN:-bazel-bin/trainer/qtrain}"  # bazel build //trainer:qtrain
QTRAIN_PS_BIN="${QTRAIN_PS_BIN:-bazel-bin/distributed/ps/qtrain_ps}"  # for a private service
PS_ADDRESS="${PS_ADDRESS:-}"                          # host:port of a running qtrain_ps
PS_STREAM="${PS_STREAM:-0}"                           # 1: metrics and checkpoints go there too
THREADS_PER_RANK="${THREADS_PER_RANK:-}"              # OpenMP threads per rank; empty: cores / NP
STOP_GRACE_S="${STOP_GRACE_S:-10}"                    # after a rank fails, the others' time to report
# ----------------------------------------------------------------------------------------------

die() { echo "ps_local.sh: error: $*" >&2; exit 2; }

[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "NP must be a positive integer, got '$NP'"
[[ "$JOB" == ps://* || -f "$JOB" ]] || die "job spec '$JOB' not found (set JOB=path/to/job.textproto)"
[[ -x "$QTRAIN_BIN" ]] || die "qtrain binary '$QTRAIN_BIN' not found (bazel build //trainer:qtrain)"

cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
if [[ -z "$THREADS_PER_RANK" ]]; then
  THREADS_PER_RANK=$((cores / NP))
  ((THREADS_PER_RANK >= 1)) || THREADS_PER_RANK=1
fi
export OMP_NUM_THREADS="$THREADS_PER_RANK"

ps_pid=""
ps_dir=""
rank_pids=()
cleanup() {
  for p in "${rank_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [[ -n "$ps_pid" ]]; then
    kill "$ps_pid" 2>/dev/null || true
    wait "$ps_pid" 2>/dev/null || true
  fi
  if [[ -n "$ps_dir" ]]; then rm -rf "$ps_dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -z "$PS_ADDRESS" ]]; then
  [[ -x "$QTRAIN_PS_BIN" ]] ||
    die "qtrain_ps '$QTRAIN_PS_BIN' not found (bazel build //distributed/ps:qtrain_ps), or set PS_ADDRESS"
  ps_dir="$(mktemp -d "${TMPDIR:-/tmp}/qtrain_ps.XXXXXX")"
  (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$ps_dir/token")
  cat > "$ps_dir/ps.textproto" <<CFG
address: "127.0.0.1:0"
storage_dir: "$ps_dir/storage"
token_file: "$ps_dir/token"
port_file: "$ps_dir/port"
CFG
  "$QTRAIN_PS_BIN" --config="$ps_dir/ps.textproto" >"$ps_dir/qtrain_ps.log" 2>&1 &
  ps_pid=$!
  for _ in $(seq 100); do
    [[ -s "$ps_dir/port" ]] && break
    kill -0 "$ps_pid" 2>/dev/null || { cat "$ps_dir/qtrain_ps.log" >&2; die "qtrain_ps did not start"; }
    sleep 0.05
  done
  [[ -s "$ps_dir/port" ]] || die "qtrain_ps did not report its port"
  PS_ADDRESS="127.0.0.1:$(cat "$ps_dir/port")"
  export QTRAIN_PS_TOKEN_FILE="$ps_dir/token"
  echo "ps_local.sh: private qtrain_ps at $PS_ADDRESS (pid $ps_pid)" >&2
fi

extra=()
if [[ "$PS_STREAM" == 1 ]]; then extra+=(--parameter_service="$PS_ADDRESS"); fi
echo "ps_local.sh: $NP ranks x $THREADS_PER_RANK threads via $PS_ADDRESS: $QTRAIN_BIN --job=$JOB $*" >&2
for ((r = 0; r < NP; ++r)); do
  "$QTRAIN_BIN" --job="$JOB" --coordinator="$PS_ADDRESS" --rank="$r" --world_size="$NP" \
    "${extra[@]}" "$@" &
  rank_pids+=($!)
  echo "ps_local.sh: rank $r pid $!" >&2
done
# Once a rank fails the others learn it (a closed connection, or the service's stop order)
# and report; whatever still runs STOP_GRACE_S later (a hung rank) is stopped: SIGTERM (with
# SIGCONT, so that a stopped process can act on it), then SIGKILL 5 s after.
status=0
remaining=("${rank_pids[@]}")
killer=""
while ((${#remaining[@]} > 0)); do
  rc=0
  finished=""
  wait -n -p finished "${remaining[@]}" || rc=$?
  [[ -n "$finished" ]] || break
  left=()
  for p in "${remaining[@]}"; do [[ "$p" == "$finished" ]] || left+=("$p"); done
  remaining=("${left[@]+"${left[@]}"}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    if ((${#remaining[@]} > 0)); then
      echo "ps_local.sh: a rank (pid $finished) exited with status $rc; the others stop" \
        "within ${STOP_GRACE_S} s" >&2
      (sleep "$STOP_GRACE_S"
       kill -TERM "${remaining[@]}" 2>/dev/null || exit 0
       kill -CONT "${remaining[@]}" 2>/dev/null
       sleep 5
       kill -KILL "${remaining[@]}" 2>/dev/null) &
      killer=$!
    fi
  fi
done
if [[ -n "$killer" ]]; then kill "$killer" 2>/dev/null || true; fi
rank_pids=()
exit "$status"
