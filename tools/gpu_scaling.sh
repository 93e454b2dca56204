#!/usr/bin/env bash
# Data parallel on the GPUs of one host (NCCL), GPT-2 124M shape on the Brown shards:
#  1. correctness: 2 ranks x batch B give the same losses as 1 rank x 2B (same global batch);
#  2. scaling: tokens/s of 2 ranks (2 GPUs) over 1 rank at the same per-GPU batch.
# Runs from a bundle (tools/bundle.sh -o dist //trainer:qtrain) in the repo root, with
# data/brown prepared. Writes logs and a summary under $OUT (default /tmp/qtrain_scaling).
# Usage: tools/gpu_scaling.sh   (env: BUNDLE=dist STEPS=30 NP=2)
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${BUNDLE:-dist}
out=${OUT:-/tmp/qtrain_scaling}
steps=${STEPS:-30}
np=${NP:-2}
mkdir -p "$out"
# NVLink SHARP (multicast) stays off: the lent multi-GPU machines ask for it.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
root_flags=()
((EUID == 0)) && root_flags=(--allow-run-as-root)
job="$out/gpt2_124m_bench.textproto"
# The shipped job with a short warmup, evaluation and a checkpoint only at the end.
sed -e 's/warmup_steps: [0-9]*/warmup_steps: 5/' -e 's/every_steps: [0-9]*/every_steps: 0/' \
    -e 's/batches: [0-9]*/batches: 2/' -e 's/keep_last: [0-9]*/keep_last: 1/' \
    configs/gpt2_124m.textproto > "$job"

run() {  # run NAME RANKS QTRAIN_FLAGS...
  local name=$1 ranks=$2
  shift 2
  echo "== $name: $ranks rank(s) $*"
  local start=$SECONDS
  if ((ranks == 1)); then
    "$bundle/qtrain" --job="$job" --out_dir="$out/$name" --steps="$steps" "$@" > "$out/$name.log" 2>&1
  else
    mpirun "${root_flags[@]}" -np "$ranks" --bind-to none -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE \
      "$bundle/qtrain" --job="$job" --out_dir="$out/$name" --steps="$steps" --backend=mpi "$@" \
      > "$out/$name.log" 2>&1
  fi
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s"; tail -3 "$out/$name.log"
  return $rc
}

status=0
run one_gpu_2b 1 --global_batch=128 || status=1   # B=32 x accum 4 on one GPU
run two_gpu_b "$np" --global_batch=128 || status=1  # B=16 x accum 4 on each GPU
run one_gpu_b 1 || status=1                        # B=16 x accum 4: the per-GPU baseline
python3 - "$out" "$np" <<'PY' | tee "$out/summary.txt"
import json, sys, os
out, np_ = sys.argv[1], int(sys.argv[2])
def rows(name):
    p = os.path.join(out, name, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
a, b, c = rows("one_gpu_2b"), rows("two_gpu_b"), rows("one_gpu_b")
ok = True
if a and b and len(a) == len(b):
    worst = max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b))
    print(f"correctness: {len(a)} steps, largest |loss(1 GPU, 2B) - loss({np_} GPUs, B)| = {worst:.3e}"
          f" (first {a[0]['train_loss']:.4f}, last {a[-1]['train_loss']:.4f} vs {b[-1]['train_loss']:.4f})")
    ok &= worst < 2e-2
else:
    print("correctness: missing runs"); ok = False
def tps(r):
    t = [x["tokens_per_s"] for x in r[3:]]  # past warm-up
    return sum(t) / len(t) if t else float("nan")
if b and c:
    s1, s2 = tps(c), tps(b)
    print(f"scaling: 1 GPU {s1:,.0f} tok/s, {np_} GPUs {s2:,.0f} tok/s, ratio {s2 / s1:.2f}x "
          f"(target >= 1.9x for 2 GPUs)")
print("PASS" if ok else "FAIL")
PY
[[ $status -eq 0 ]] && grep -q '^PASS' "$out/summary.txt"
