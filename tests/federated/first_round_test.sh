#!/usr/bin/env bash
# A federation's first round is sampled from every logical client, not from those of whichever
# client process joined first: with half the clients sampled per round and the second process
# joining 3 s after the first, round 1 must wait for it (before the fix it started at once, with
# exactly the first process's clients).
set -euo pipefail
source "$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}/tests/federated/fed_test_lib.sh"

make_base "$work/base.safetensors"
write_job first 2 0.5 "client_timeout_s: 20"
start_ps
start_client early first --clients=0,2
wait_for "$work/ps.log" "(clients 0,2) joined" 60
sleep 3
grep -q "round 1/2" "$work/ps.log" && fail "round 1 was sampled before every client had joined"
start_client late first --clients=1,3
wait_for "$work/ps.log" "finished 2 rounds" 90
joined="$(grep -n "(clients 1,3) joined" "$work/ps.log" | head -1 | cut -d: -f1)"
round1="$(grep -n "round 1/2: clients" "$work/ps.log" | head -1 | cut -d: -f1)"
[[ -n "$joined" && -n "$round1" ]] || fail "no join or round 1 line in ps.log"
((joined < round1)) || fail "round 1 (ps.log line $round1) began before the late process joined (line $joined)"
wait_for "$work/early.log" "the federation finished" 30
wait_for "$work/late.log" "the federation finished" 30
echo PASS
