#!/usr/bin/env bash
# A federation on this machine over loopback: qtrain_ps (with the federated service) and
# PROCS client processes serving the job's federated.clients logical clients round-robin
# (process p serves clients p, p + PROCS, ...: K processes for N clients, as Flower's
# simulation engine pools them). Waits for the clients, stops the server, and exits non-zero if
# any process failed. docs/federated.md.
#
#   JOB=configs/federated_brown.textproto PROCS=2 launch/federated_sim.sh
#
# Environment: JOB (required), PROCS (default 2), WORK (server storage, token and logs; default
# out/<job name>.sim), PORT (default 0: any free port), PS_BIN / CLIENT_BIN (default
# bazel-bin/...; build with `bazel build //distributed/ps:qtrain_ps
# //distributed/federated:qtrain_fed_client`), CLIENT_ARGS (extra client flags).
set -euo pipefail
JOB="${JOB:?set JOB to a federated job spec}"
PROCS="${PROCS:-2}"
PS_BIN="${PS_BIN:-bazel-bin/distributed/ps/qtrain_ps}"
CLIENT_BIN="${CLIENT_BIN:-bazel-bin/distributed/federated/qtrain_fed_client}"
PORT="${PORT:-0}"
CLIENT_ARGS="${CLIENT_ARGS:-}"
[[ -f "$JOB" ]] || { echo "federated_sim: job spec '$JOB' not found" >&2; exit 2; }
for b in "$PS_BIN" "$CLIENT_BIN"; do
  [[ -x "$b" ]] || { echo "federated_sim: '$b' is not an executable (bazel build it)" >&2; exit 2; }
done
name="$(sed -n 's/^ *name: *"\([^"]*\)".*/\1/p' "$JOB" | head -1)"
clients="$(grep -oE '\bclients: *[0-9]+' "$JOB" | grep -oE '[0-9]+' | head -1)"
[[ -n "$name" && -n "$clients" ]] || { echo "federated_sim: no name or federated.clients in $JOB" >&2; exit 2; }
WORK="${WORK:-out/$name.sim}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
if [[ ! -s "$WORK/token" ]]; then
  (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/token")
fi
cat >"$WORK/ps.textproto" <<CFG
address: "127.0.0.1:$PORT"
storage_dir: "$WORK/ps"
token_file: "$WORK/token"
port_file: "$WORK/port"
CFG
rm -f "$WORK/port"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

"$PS_BIN" --config="$WORK/ps.textproto" >>"$WORK/ps.log" 2>&1 &
ps_pid=$!
pids+=("$ps_pid")
for _ in $(seq 300); do [[ -s "$WORK/port" ]] && break; sleep 0.1; done
[[ -s "$WORK/port" ]] || { echo "federated_sim: qtrain_ps did not start; see $WORK/ps.log" >&2; exit 1; }
address="127.0.0.1:$(cat "$WORK/port")"
echo "federated_sim: qtrain_ps on $address (log $WORK/ps.log); $clients clients in $PROCS processes"

client_pids=()
for ((p = 0; p < PROCS; ++p)); do
  list=""
  for ((c = p; c < clients; c += PROCS)); do list+="${list:+,}$c"; done
  [[ -n "$list" ]] || continue
  # shellcheck disable=SC2086  # CLIENT_ARGS is a list of words on purpose
  "$CLIENT_BIN" --job="$JOB" --server="$address" --token_file="$WORK/token" --clients="$list" \
    $CLIENT_ARGS >"$WORK/client_$p.log" 2>&1 &
  client_pids+=($!)
  pids+=($!)
  echo "federated_sim: process $p serves clients $list (log $WORK/client_$p.log)"
done

rc=0
for p in "${client_pids[@]}"; do wait "$p" || rc=1; done
kill -TERM "$ps_pid" 2>/dev/null || true
wait "$ps_pid" || true
grep "federated $name:" "$WORK/ps.log" | tail -3
if ((rc != 0)); then
  echo "federated_sim: a client failed; see $WORK/client_*.log" >&2
  tail -5 "$WORK"/client_*.log >&2
fi
exit "$rc"
