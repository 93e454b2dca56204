#!/usr/bin/env bash
# A server restart between rounds: qtrain_ps is stopped after round 2, started again on the
# same port and storage; it resumes the federation from its last round checkpoint (the adapter
# tensor set's latest version) while the clients ride out the outage and rejoin; every round
# appears once in rounds.jsonl and the federation completes.
set -euo pipefail
source "$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}/tests/federated/fed_test_lib.sh"

make_base "$work/base.safetensors"
write_job restart 5 0.5 "client_timeout_s: 3 local_optimizer: SGD"
start_ps
start_client a restart --client_range=0:2
start_client b restart --client_range=2:4
wait_for "$work/ps.log" "round 2/5 done" 120
kill -TERM "$PS_PID"
wait "$PS_PID" || true
done_before=$(grep -c "done:" "$work/ps.log")
start_ps "$PORT"
wait_for "$work/ps.log" "resuming after round $done_before from restart.fed.adapter" 60
wait_for "$work/ps.log" "finished 5 rounds" 120
for c in a b; do wait_for "$work/$c.log" "the federation finished" 30; done
grep -q "reconnecting" "$work/a.log" || fail "client a never saw the outage"

python3 - "$work/out_restart/rounds.jsonl" "$work/ps/tensors" <<'PY' || fail "rounds.jsonl / checkpoint"
import glob, json, os, sys
all_rows = [json.loads(l) for l in open(sys.argv[1])]
assert all_rows[0]["step"] == 0 and "val_loss" in all_rows[0], all_rows[0]  # the base
rows = all_rows[1:]
assert [r["step"] for r in rows] == [1, 2, 3, 4, 5], [r["step"] for r in rows]
assert all(r["clients_answered"] == 2 for r in rows), rows
# The last committed version (a safetensors file; the metadata in its header) says round 5.
import struct
files = sorted(glob.glob(os.path.join(sys.argv[2], "restart.fed.adapter", "v_*.safetensors")))
b = open(files[-1], "rb").read()
header = json.loads(b[8:8 + struct.unpack("<Q", b[:8])[0]])
assert header["__metadata__"]["round"] == "5", header["__metadata__"]
PY
echo "restart_test: PASS"
