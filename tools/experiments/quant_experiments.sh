#!/usr/bin/env bash
# Reproduces docs/experiments.md on the CPU (2 cores: about 15 minutes):
#  (a) W4A4 QAT from a trained full-precision checkpoint, with and without Phi (QVGen rank
#      decay): val loss gap to full precision, gradient norms, Phi's rank over time;
#  (b) training with TWEO on and off: peak activation per block, and the val loss of W8A8
#      per-tensor PTQ of each.
# Usage: tools/experiments/quant_experiments.sh [OUT_DIR]   (default out/experiments)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-out/experiments}
mkdir -p "$out"
# QTRAIN_BIN: a folder with trainer/qtrain and tools/{ptq,export,eval_export} built already.
bin=${QTRAIN_BIN:-bazel-bin}
if [[ -z "${QTRAIN_BIN:-}" ]]; then
  bazel build //trainer:qtrain //tools:ptq //tools:export //tools:eval_export >"$out/build.log" 2>&1 ||
    { echo "build failed: see $out/build.log" >&2; exit 1; }
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
steps_fp=${STEPS_FP:-600}
steps_qat=${STEPS_QAT:-300}

job() {  # job NAME LR WARMUP EXTRA_TRAINING EXTRA_TOP: the default job's model and data
  cat > "$out/$1.textproto" <<JOB
name: "$1"
seed: 1337
out_dir: "$out/$1"
model { n_layer: 4 n_embd: 128 n_head: 4 max_seq_len: 128 }
optimizer { lr: $2 }
schedule { warmup_steps: $3 }
training { steps: 600 batch_size: 16 seq_len: 128 $4 }
eval { every_steps: 50 batches: 16 }
checkpoint { every_steps: 0 keep_last: 1 }
logging { every_steps: 100 }
$5
JOB
}
run() {  # run NAME --steps=N: skipped when an earlier invocation finished it
  local steps=${2#--steps=}
  if [[ -f "$out/$1/metrics.jsonl" && $(wc -l < "$out/$1/metrics.jsonl") -eq $steps ]] &&
     compgen -G "$out/$1/checkpoints/step_*.safetensors" > /dev/null; then
    echo "== $1: done earlier"; return
  fi
  echo "== $1"
  # An earlier invocation that stopped part-way left a run there: start it afresh.
  "$bin/trainer/qtrain" --job="$out/$1.textproto" --out_dir="$out/$1" --overwrite "${@:2}" | grep -E "^(step .*val|done)"
}
last_ckpt() { ls "$out/$1"/checkpoints/step_*.safetensors | tail -1; }

# (b) full precision with TWEO off (also the baseline of (a)) and on.
job fp 3e-3 50 "" ""
job fp_tweo 3e-3 50 "" 'precision { tweo { enabled: true } }'
run fp --steps="$steps_fp"
run fp_tweo --steps="$steps_fp"
for r in fp fp_tweo; do
  "$bin/tools/ptq" --checkpoint="$(last_ckpt $r)" --calib_batches=16 | tail -1 > "$out/$r.ptq.json"
  "$bin/tools/ptq" --checkpoint="$(last_ckpt $r)" --calib_batches=16 --bits=4 | tail -1 > "$out/$r.ptq4.json"
done

# (a) W4A4 QAT from the full-precision checkpoint, with and without Phi. Phi starts at rank
# 32 and halves every 40 steps: 32 -> 0 after 6 periods (240 steps), the rest runs without it.
init=$(last_ckpt fp)
qat='linear: QAT qat { weight_bits: 4 act_bits: 4 }'
# The fair full-precision baseline of (a): the same 300 extra steps without quantization.
job fp_cont 1e-3 20 "init_from: \"$init\"" ""
job qat_w4a4 1e-3 20 "init_from: \"$init\"" "precision { $qat }"
job qat_w4a4_phi 1e-3 20 "init_from: \"$init\"" \
  "precision { $qat aux_lowrank { enabled: true rank: 32 decay_period: 40 } }"
run fp_cont --steps="$steps_qat"
run qat_w4a4 --steps="$steps_qat"
run qat_w4a4_phi --steps="$steps_qat"
for r in qat_w4a4 qat_w4a4_phi; do
  "$bin/tools/export" --checkpoint="$(last_ckpt $r)" --out="$out/$r.export.safetensors" >/dev/null
  "$bin/tools/eval_export" --export_path="$out/$r.export.safetensors" > "$out/$r.export_eval.txt"
done

python3 tools/plot_metrics.py "$out/qat_w4a4/metrics.jsonl" "$out/qat_w4a4_phi/metrics.jsonl" \
  --keys train_loss,val_loss,grad_norm,phi_rank.0 -o "$out/qat.svg"
python3 tools/plot_metrics.py "$out/fp/metrics.jsonl" "$out/fp_tweo/metrics.jsonl" \
  --keys train_loss,val_loss,peak_act.0,peak_act.3,kurtosis.3 -o "$out/tweo.svg"
python3 tools/experiments/summarize.py "$out" | tee "$out/summary.md"
