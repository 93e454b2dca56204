#!/usr/bin/env bash
# launch/slurm/federated.sbatch on a private one-node Slurm cluster (tests/distributed/
# slurm_cluster.sh): task 0 runs qtrain_ps, task 1 a client process pooling all four logical
# clients; sbatch -W returns once the federation finished; its rounds are all there.
set -euo pipefail
source "$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}/tests/federated/fed_test_lib.sh"
source "$ws/tests/distributed/slurm_cluster.sh"
sbatch_file="$ws/launch/slurm/federated.sbatch"

cluster="$(mktemp -d /tmp/qtrain-fedslurm.XXXXXX)"
cleanup() {
  local rc=$?
  slurm_cluster_stop
  if ((rc != 0)); then _sc_dump_logs; fi
  rm -rf "$cluster"
  stop_all
  exit "$rc"
}
trap cleanup EXIT

make_base "$work/base.safetensors"
write_job slurmfed 3 1.0 "client_timeout_s: 5"
slurm_cluster_start "$cluster"
(cd "$work" && JOB="$work/slurmfed.textproto" PS_BIN="$PS" CLIENT_BIN="$CLIENT" WORK="$work/slurm" \
  sbatch -W --ntasks=2 --output="$work/sbatch.log" "$sbatch_file") || fail "sbatch failed: $(cat "$work/sbatch.log")"
grep -q "finished 3 rounds" "$work/slurm/ps.log" || fail "the server did not finish: $(tail "$work/slurm/ps.log")"
grep -q "the federation finished" "$work/slurm/client_0.log" || fail "the client did not finish"
python3 - "$work/out_slurmfed/rounds.jsonl" <<'PY' || fail "rounds.jsonl"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["step"] for r in rows] == [0, 1, 2, 3], rows
assert all(r["clients_answered"] == 4 for r in rows[1:]), rows
PY
echo "slurm_federated_test: PASS"
