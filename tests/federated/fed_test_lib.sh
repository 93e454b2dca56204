#!/usr/bin/env bash
# Helpers of the federated end-to-end tests: a tiny base model, a federated job over Brown
# genres, qtrain_ps on a loopback port, client processes, and waits bounded in time. Every
# process is started here and stopped by its own pid.
set -euo pipefail

ws="$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}"
QTRAIN="$ws/trainer/qtrain"
PS="$ws/distributed/ps/qtrain_ps"
CLIENT="$ws/distributed/federated/qtrain_fed_client"
source "$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}/tests/data_dir.sh"  # QTRAIN_DATA_DIR
work="${TEST_TMPDIR:-$(mktemp -d)}/fed"
rm -rf "$work"
mkdir -p "$work"
PIDS=()

fail() {
  echo "FAIL: $*" >&2
  for f in "$work"/*.log; do echo "=== $f"; tail -40 "$f"; done >&2
  exit 1
}

stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop_all EXIT

# wait_for FILE PATTERN SECONDS: until grep finds PATTERN in FILE.
wait_for() {
  local file="$1" pattern="$2" secs="$3" t=0
  while ! grep -q -- "$pattern" "$file" 2>/dev/null; do
    sleep 0.2
    t=$((t + 1))
    ((t < secs * 5)) || fail "no '$pattern' in $file after ${secs}s"
  done
}

# make_base DEST [SEED]: a 1-layer base trained for a few steps on genres the clients do not
# hold, copied to DEST. Jobs name it by the relative path base.safetensors, which each process
# resolves in its own folder (the server's and the clients' is $work).
make_base() {
  local dest="$1" seed="${2:-1}"
  cat >"$work/base$seed.textproto" <<JOB
name: "base$seed" seed: $seed out_dir: "$work/base$seed"
model { n_layer: 1 n_embd: 32 n_head: 2 max_seq_len: 32 }
data { train_pattern: "$QTRAIN_DATA_DIR/train_[abc].bin" val_pattern: "$QTRAIN_DATA_DIR/val_a.bin" }
optimizer { lr: 3e-3 }
training { steps: 3 batch_size: 4 seq_len: 32 }
eval { batches: 1 }
JOB
  "$QTRAIN" --job="$work/base$seed.textproto" >"$work/base$seed.log" 2>&1 || fail "base training"
  cp "$work/base$seed/checkpoints/step_00000003.safetensors" "$dest" || fail "no base checkpoint"
}

# write_job NAME ROUNDS FRACTION EXTRA_FEDERATED_FIELDS
write_job() {
  cat >"$work/$1.textproto" <<JOB
name: "$1" seed: 5 out_dir: "$work/out_$1"
model { n_layer: 1 n_embd: 32 n_head: 2 max_seq_len: 32 }
data { train_pattern: "unused" val_pattern: "$QTRAIN_DATA_DIR/val_h.bin"
       genres: "h" genres: "j" genres: "k" genres: "l" }
optimizer { lr: 3e-3 }
training { batch_size: 4 seq_len: 32 }
eval { batches: 1 }
lora { rank: 2 base: "base.safetensors" }
federated { aggregation: FEDSVD rounds: $2 clients: 4 local_steps: 2 client_fraction: $3
            min_clients: 2 client_train_pattern: "$QTRAIN_DATA_DIR/train_{genre}.bin"
            eval_every_rounds: 1 $4 }
JOB
}

# start_ps [PORT]: qtrain_ps with the federated module; sets PS_PID and PORT.
start_ps() {
  local address="127.0.0.1:${1:-0}"
  if [[ ! -f "$work/token" ]]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
    chmod 600 "$work/token"
  fi
  cat >"$work/ps.textproto" <<CFG
address: "$address" storage_dir: "$work/ps" token_file: "$work/token" port_file: "$work/port"
CFG
  rm -f "$work/port"
  (cd "$work" && exec "$PS" --config="$work/ps.textproto") >>"$work/ps.log" 2>&1 &
  PS_PID=$!
  PIDS+=("$PS_PID")
  local t=0
  while [[ ! -s "$work/port" ]]; do
    sleep 0.1
    t=$((t + 1))
    ((t < 300)) || fail "qtrain_ps did not start"
  done
  PORT="$(cat "$work/port")"
}

# start_client NAME JOB ARGS...: a client process in $work logging to NAME.log; sets CLIENT_PID.
start_client() {
  local name="$1" job="$2"
  shift 2
  (cd "$work" && exec "$CLIENT" --job="$work/$job.textproto" --server="127.0.0.1:$PORT" \
    --token_file="$work/token" --server_wait_s=60 "$@") >"$work/$name.log" 2>&1 &
  CLIENT_PID=$!
  PIDS+=("$CLIENT_PID")
}
