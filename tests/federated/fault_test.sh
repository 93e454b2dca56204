#!/usr/bin/env bash
# Faults of a federation over loopback (qtrain_ps + client processes, every client sampled each
# round): a client that dies mid-round (round 2) and one that stalls (round 3) do not stall their
# rounds, which complete with the others, dropouts logged by client; the restarted clients
# rejoin and train the current round; a client with a wrong token and one with a base of
# another hash are refused by name; everything answered is aggregated.
set -euo pipefail
source "$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}/tests/federated/fed_test_lib.sh"

make_base "$work/base.safetensors"
write_job fault 5 1.0 "round_timeout_s: 6 client_timeout_s: 2"
start_ps

# A wrong token: refused before anything else, naming the token.
echo "not-the-token-0123456789" >"$work/bad_token"
chmod 600 "$work/bad_token"
if (cd "$work" && exec "$CLIENT" --job="$work/fault.textproto" --server="127.0.0.1:$PORT" \
  --token_file="$work/bad_token" --clients=0 --server_wait_s=5) >"$work/bad_token.log" 2>&1; then
  fail "a client with a wrong token was let in"
fi
grep -q "invalid bearer token" "$work/bad_token.log" || fail "the wrong token is not named"

start_client dies fault --clients=0 --fault=die --fault_round=1
start_client stalls fault --clients=1 --fault=stall --fault_round=2
STALL_PID=$CLIENT_PID
start_client pooled fault --clients=2,3

# A base of another hash under the same spec text: base.safetensors resolves, in that
# process's folder, to a base trained with another seed (a node with a stale copy).
mkdir -p "$work/other"
make_base "$work/other/base.safetensors" 2
if (cd "$work/other" && exec "$CLIENT" --job="$work/fault.textproto" --server="127.0.0.1:$PORT" \
  --token_file="$work/token" --clients=1 --server_wait_s=5) >"$work/other_base.log" 2>&1; then
  fail "a client with another base was let in"
fi
grep -q "has hash .*, the federation's has .*: not joining" "$work/other_base.log" ||
  fail "the other base is not refused by name"

# Round 2: the dying client's task goes unanswered; the round ends once it is seen dead.
wait_for "$work/dies.log" "fault injection: die in round 2" 60
wait_for "$work/ps.log" "round 2/5 done: 3 of 4 answered" 60
grep -q "round 2: .*dropped client 0: worker .* is dead" "$work/ps.log" || fail "round 2's dropout not logged"
start_client rejoined fault --clients=0

# Round 3: the stalled client keeps its heartbeats; the round ends at its timeout.
wait_for "$work/stalls.log" "fault injection: stall in round 3" 60
wait_for "$work/ps.log" "round 3/5 done" 60
grep -q "round 3: round timeout; dropped client 1: no answer by the round timeout (stalled)" \
  "$work/ps.log" || fail "round 3's dropout not logged"
kill -9 "$STALL_PID"
start_client restarted fault --clients=1

wait_for "$work/ps.log" "finished 5 rounds" 120
for c in pooled rejoined restarted; do
  wait_for "$work/$c.log" "the federation finished" 30
done
# The rejoined client trained a round that was current when it came back, and it counted.
grep -Eq "client 0 round [345]: .* accepted" "$work/rejoined.log" || fail "the rejoined client did not train"
grep -Eq "client 1 round [45]: .* accepted" "$work/restarted.log" || fail "the restarted client did not train"

python3 - "$work/out_fault/rounds.jsonl" <<'PY' || fail "rounds.jsonl"
import json, sys
all_rows = [json.loads(l) for l in open(sys.argv[1])]
assert all_rows[0]["step"] == 0 and "val_loss" in all_rows[0], all_rows[0]  # the base
rows = all_rows[1:]
assert [r["step"] for r in rows] == [1, 2, 3, 4, 5], rows
assert rows[0]["clients_answered"] == 4 and rows[0]["clients_dropped"] == 0, rows[0]
assert rows[1]["clients_answered"] == 3 and rows[1]["clients_dropped"] == 1, rows[1]
assert rows[2]["clients_dropped"] == 1 and rows[2]["clients_answered"] >= 2, rows[2]
assert all(r["orthonormality_error"] < 1e-5 for r in rows)
assert all(r["val_loss"] == r["val_loss"] for r in rows)  # evaluated every round
PY
echo "fault_test: PASS"
