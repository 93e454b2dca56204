#!/usr/bin/env bash
# End to end: the default job (configs/tiny_cpu.textproto) trains on the Brown shards that
# tools/setup.sh prepared and must reach a val loss well below ln(256) = 5.55 nats per byte.
# tools/test.sh passes the shard folder as QTRAIN_DATA_DIR (tests/data_dir.sh finds it otherwise).
set -euo pipefail
threshold=${QTRAIN_E2E_MAX_VAL_LOSS:-2.7}  # measured 2.43 (docs/experiments.md, run "fp")
source tests/data_dir.sh  # QTRAIN_DATA_DIR: tools/test.sh's, else the source tree's data/brown
out="${TEST_TMPDIR:-/tmp}/default_job"
rm -rf "$out"
job="$out.textproto"
# The shipped job, with data read from the prepared folder.
sed -e "s|data/brown/|${QTRAIN_DATA_DIR}/|g" configs/tiny_cpu.textproto > "$job"
OMP_NUM_THREADS=2 trainer/qtrain --job="$job" --out_dir="$out" | tee "$out.log"
val=$(grep '"val_loss"' "$out/metrics.jsonl" | tail -1 | sed -E 's/.*"val_loss":([0-9.eE+-]+).*/\1/')
first=$(grep '"val_loss"' "$out/metrics.jsonl" | head -1 | sed -E 's/.*"val_loss":([0-9.eE+-]+).*/\1/')
echo "first val loss $first, final val loss $val, threshold $threshold"
for f in "$out/job_spec.textproto" "$out"/checkpoints/step_*.safetensors; do
  [[ -f "$f" ]] || { echo "FAIL: missing $f" >&2; exit 1; }
done
grep -q '^done: ' "$out.log" || { echo "FAIL: no final summary line" >&2; exit 1; }
awk -v v="$val" -v t="$threshold" -v f="$first" 'BEGIN { exit !(v < t && v < f) }' ||
  { echo "FAIL: final val loss $val is not below $threshold and the first eval $first" >&2; exit 1; }
echo "PASS"
