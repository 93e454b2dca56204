#!/usr/bin/env bash
# The shipped CPU workflow jobs run as they are, for a few steps each: the default job
# (configs/tiny_cpu.textproto), FP8 (configs/fp8_cpu.textproto), and W4A4 QAT with Phi and
# TWEO (configs/qat_w4a4_phi_tweo.textproto) from the default job's checkpoint, whose packed
# export evaluates to the fake-quant model's val loss. The job files are used unchanged, from a
# folder where data/ is the prepared data (their relative paths then resolve as in the repo);
# only the length is overridden on the command line.
set -euo pipefail
source tests/data_dir.sh  # QTRAIN_DATA_DIR: tools/test.sh's, else the source tree's data/brown
bin="$PWD"
fail() { echo "FAIL: $*" >&2; exit 1; }
work="${TEST_TMPDIR:-/tmp}/workflow_jobs"
rm -rf "$work"
mkdir -p "$work/data"
ln -s "$(cd "$QTRAIN_DATA_DIR" && pwd)" "$work/data/brown"
cp configs/tiny_cpu.textproto configs/fp8_cpu.textproto configs/qat_w4a4_phi_tweo.textproto "$work/"
cd "$work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# A few steps, two val batches, a checkpoint at the end.
short=(--steps=4 --set=schedule.warmup_steps=1 --set=eval.every_steps=0 --set=eval.batches=2
       --set=checkpoint.every_steps=0 --quiet)
last_val() { grep '"val_loss"' "$1" | tail -1 | sed -E 's/.*"val_loss":([0-9.eE+-]+).*/\1/'; }

"$bin/trainer/qtrain" --job=tiny_cpu.textproto "${short[@]}"
[[ -f out/tiny_cpu/checkpoints/step_00000004.safetensors ]] || fail "tiny_cpu wrote no checkpoint"
echo "ok: tiny_cpu"

"$bin/trainer/qtrain" --job=fp8_cpu.textproto "${short[@]}"
grep -q 'linear: FP8' out/fp8_cpu/job_spec.textproto || fail "fp8_cpu did not run in FP8"
v=$(last_val out/fp8_cpu/metrics.jsonl)
awk -v v="$v" 'BEGIN { exit !(v > 0 && v < 5.6) }' || fail "fp8_cpu val loss $v is not below ln(256)"
echo "ok: fp8_cpu (val $v)"

# The shipped init_from names the 600-step checkpoint; this run has the 4-step one. Phi decays
# every step here, so it is gone (rank 0) by step 6 and the export is the trained model.
"$bin/trainer/qtrain" --job=qat_w4a4_phi_tweo.textproto "${short[@]/--steps=4/--steps=8}" \
  --set=training.init_from=out/tiny_cpu/checkpoints/step_00000004.safetensors \
  --set=precision.aux_lowrank.decay_period=1
grep -q '"phi_rank.0"' out/qat_w4a4_phi_tweo/metrics.jsonl || fail "qat job logged no Phi rank"
grep -q '"tweo_loss"' out/qat_w4a4_phi_tweo/metrics.jsonl || fail "qat job logged no TWEO loss"
rank=$(tail -1 out/qat_w4a4_phi_tweo/metrics.jsonl | sed -E 's/.*"phi_rank.0":([0-9.]+).*/\1/')
awk -v r="$rank" 'BEGIN { exit !(r == 0) }' || fail "Phi rank at the end is $rank, not 0"
qat_val=$(last_val out/qat_w4a4_phi_tweo/metrics.jsonl)
"$bin/tools/export" --checkpoint=out/qat_w4a4_phi_tweo/checkpoints/step_00000008.safetensors \
  --out=qat.export.safetensors
exp_val=$("$bin/tools/eval_export" --export_path=qat.export.safetensors --batches=2 |
  sed -nE 's/^val_loss ([0-9.]+).*/\1/p' | tail -1)
[[ -n "$exp_val" ]] || fail "eval_export printed no val loss"
awk -v a="$qat_val" -v b="$exp_val" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-4) }' ||
  fail "export val loss $exp_val differs from the QAT model's $qat_val"
echo "ok: qat_w4a4_phi_tweo (val $qat_val, from the export $exp_val)"
echo "PASS"
