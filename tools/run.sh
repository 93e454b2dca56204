#!/usr/bin/env bash
# qtrain's headline workflow on the CPU, after setting up this machine (tools/setup.sh:
# packages, Brown corpus, shards) and building:
#   1. full-precision training of the default job (configs/tiny_cpu.textproto, 600 steps);
#   2. W4A4 QAT with Phi and TWEO from its last checkpoint (configs/qat_w4a4_phi_tweo.textproto);
#   3. the packed 4-bit export (//tools:export) and the val loss computed from it
#      (//tools:eval_export);
#   4. a table (FP val loss, QAT val loss, export val loss, Phi rank, peak outlier) and plots of
#      both runs (tools/plot_metrics.py).
# A step whose output is complete already is skipped; one that stopped part-way resumes from
# its newest checkpoint. About 5 minutes on 2 cores.
#
# With arguments it trains one job instead, passing them to qtrain:
#   tools/run.sh --job=configs/fp8_cpu.textproto     tools/run.sh --steps=100 (the default job)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

if [[ $# -gt 0 ]]; then
  bazel build //trainer:qtrain
  job=configs/tiny_cpu.textproto
  args=()
  for arg in "$@"; do
    case "$arg" in --job=*) job="${arg#--job=}" ;; *) args+=("$arg") ;; esac
  done
  exec bazel-bin/trainer/qtrain --job="$job" "${args[@]+"${args[@]}"}"
fi

bazel build //trainer:qtrain //tools:export //tools:eval_export
start=$SECONDS

# Trains JOB into OUT_DIR: afresh, or resuming an interrupted run (qtrain says when it is
# already finished, and refuses a run whose job file changed since: see its message).
train() {  # train JOB OUT_DIR
  local resume=()
  compgen -G "$2/checkpoints/step_*.safetensors" > /dev/null && resume=(--resume=latest)
  bazel-bin/trainer/qtrain --job="$1" "${resume[@]+"${resume[@]}"}" |
    grep -E --line-buffered '^(qtrain|initialised|step .*val loss|done|.*already finished)'
}

fp=out/tiny_cpu
qat=out/qat_w4a4_phi_tweo
echo "== 1/3 full-precision training: configs/tiny_cpu.textproto -> $fp"
train configs/tiny_cpu.textproto "$fp"
echo "== 2/3 W4A4 QAT with Phi and TWEO from $fp: configs/qat_w4a4_phi_tweo.textproto -> $qat"
train configs/qat_w4a4_phi_tweo.textproto "$qat"
ckpt=$(ls "$qat"/checkpoints/step_*.safetensors | tail -1)
echo "== 3/3 packed 4-bit export of $ckpt and its val loss"
bazel-bin/tools/export --checkpoint="$ckpt" --out="$qat/export.safetensors"
export_val=$(bazel-bin/tools/eval_export --export_path="$qat/export.safetensors" |
  sed -nE 's/^val_loss ([0-9.]+).*/\1/p')

python3 tools/plot_metrics.py "$fp/metrics.jsonl" --keys train_loss,val_loss,peak_act.max,lr \
  -o "$fp/metrics.svg" > /dev/null
python3 tools/plot_metrics.py "$qat/metrics.jsonl" \
  --keys train_loss,val_loss,phi_rank.max,peak_act.max,tweo_loss -o "$qat/metrics.svg" > /dev/null

python3 - "$fp/metrics.jsonl" "$qat/metrics.jsonl" "$export_val" $((SECONDS - start)) <<'PY'
import json, sys
fp, qat, export_val, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def rows(path):
    return [json.loads(l) for l in open(path) if l.strip()]
def last(rs, key):
    vals = [r[key] for r in rs if key in r]
    return vals[-1] if vals else float("nan")
def block_max(r, prefix):
    vals = [v for k, v in r.items() if k.startswith(prefix + ".")]
    return max(vals) if vals else float("nan")
f, q = rows(fp), rows(qat)
fq = [r for r in f if any(k.startswith("peak_act.") for k in r)][-1]
qq = [r for r in q if any(k.startswith("peak_act.") for k in r)][-1]
qr = [r for r in q if any(k.startswith("phi_rank.") for k in r)]
print()
print("| run | steps | val loss | Phi rank (start -> end) | peak outlier (max abs. block output, last step) |")
print("|---|---|---|---|---|")
print("| full precision (tiny_cpu) | %d | %.4f | - | %.1f |" % (f[-1]["step"], last(f, "val_loss"), block_max(fq, "peak_act")))
print("| W4A4 QAT + Phi + TWEO | %d | %.4f | %d -> %d | %.1f |" % (
    q[-1]["step"], last(q, "val_loss"), block_max(qr[0], "phi_rank"), block_max(qr[-1], "phi_rank"),
    block_max(qq, "peak_act")))
print("| packed 4-bit export (eval_export) | | %s | | |" % (("%.4f" % float(export_val)) if export_val else "?"))
print()
print("QAT - FP val loss: %+.4f nats per byte (QAT also trains %d more steps, with TWEO; the"
      % (last(q, "val_loss") - last(f, "val_loss"), q[-1]["step"]))
print("  same-steps comparison is in docs/experiments.md); export - QAT: %+.6f (the export holds"
      % (round(float(export_val or "nan") - last(q, "val_loss"), 6) + 0.0))
print("  the 4-bit codes QAT trained, Phi decayed to rank 0)")
print("plots: %s, %s; took %d s" % (fp.replace("metrics.jsonl", "metrics.svg"),
                                    qat.replace("metrics.jsonl", "metrics.svg"), secs))
PY
