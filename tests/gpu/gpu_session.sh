#!/usr/bin/env bash
# One call on the GPU machine: every GPU test of a bundle (tools/gpu_tests.sh), then the
# training-step benchmark (//tools:bench) and the PyTorch anchor (torch_anchor.py --modes bf16)
# at the GPT-2 shapes, one after the other in the same call, logs under $OUT (or DIST/logs).
#
# Here:  QTRAIN_BUNDLE_WRAPPERS=1 tools/bundle.sh -o .device/dist --strip --keep-server \
#          $(bazel query 'attr(tags, "\bgpu\b", tests(//tests/ops/... + //tests/gpu/...))') \
#          //tools:bench //trainer:qtrain       # (wrappers: qtrain's MPI libraries stay the node's)
#        mkdir -p .device/anchors && cp ../shared/anchors/torch_anchor.py .device/anchors/
#        mkdir -p .device/train/data/brown && cp data/brown/mixed_*.bin .device/train/data/brown/
# There: tests/gpu/gpu_session.sh [--dist .device/dist] [--anchor .device/anchors/torch_anchor.py]
#          [--shapes 124m,350m,1558m] [--no-tests] [--no-anchor] [--kernel-bench] [--memcheck]
#          [--train DIR] [--precisions fp8,fp8cur,fp8blk,w4a4,w4a4phi,w8a8i8,w4a8i8]
#          [--tar .device/dist.tar.xz] [--anchor-modes bf16,fp8,w4a4]
# --train DIR: qtrain (in the bundle) trains the 124M shape for 400 steps on the Brown shards
#   under DIR/data/brown (run from DIR), then resumes a second run from its step-200 checkpoint;
#   the two runs' losses for steps 201-400 must agree exactly. --shapes "" skips the benchmarks.
# --precisions: per shape, the bench also runs each named precision (bench --precision, the
#   table below); --anchor-modes: the PyTorch anchor's modes (default bf16).
# --tar: the bundle as a tar.xz (what fits the machine's 64 MiB), unpacked to /tmp first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

dist=.device/dist
anchor=.device/anchors/torch_anchor.py
shapes=124m,350m,1558m
tests=1
run_anchor=1
kernel_bench=0
memcheck=0
train_dir=
steps=30
precisions=
anchor_modes=bf16
tarball=
while (($#)); do
  case "$1" in
    --dist) dist="$2"; shift 2 ;;
    --anchor) anchor="$2"; shift 2 ;;
    --shapes) shapes="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --no-tests) tests=0; shift ;;
    --no-anchor) run_anchor=0; shift ;;
    --kernel-bench) kernel_bench=1; shift ;;
    --memcheck) memcheck=1; shift ;;
    --train) train_dir="$2"; shift 2 ;;
    --precisions) precisions="$2"; shift 2 ;;
    --anchor-modes) anchor_modes="$2"; shift 2 ;;
    --tar) tarball="$2"; shift 2 ;;
    *) echo "gpu_session: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
if [[ -n "$tarball" ]]; then
  mkdir -p /tmp/qtrain_bundle && tar xJf "$tarball" -C /tmp/qtrain_bundle || exit 2
  dist="/tmp/qtrain_bundle/$(tar tJf "$tarball" | head -1 | cut -d/ -f1)"
fi
out="${OUT:-$dist/logs}"
# The named precisions of --precisions (bench --precision replaces the job's block).
declare -A precision_of=(
  [fp8]='linear: FP8'
  [fp8cur]='linear: FP8 fp8 { scaling: CURRENT }'
  [fp8blk]='linear: FP8 fp8 { scaling: BLOCK }'
  [fp8tweo]='linear: FP8 tweo { enabled: true }'
  [w4a4]='linear: QAT qat { weight_bits: 4 act_bits: 4 }'
  [w4a4phi]='linear: QAT qat { weight_bits: 4 act_bits: 4 } aux_lowrank { enabled: true rank: 32 decay_period: 100000 }'
  [w4a4tok]='linear: QAT qat { weight_bits: 4 act_bits: 4 act_granularity: PER_TOKEN }'
  [w4a16]='linear: QAT qat { weight_bits: 4 }'
  [w8a8t]='linear: QAT qat { weight_bits: 8 act_bits: 8 }'
  [w8a8]='linear: QAT qat { weight_bits: 8 act_bits: 8 act_granularity: PER_TOKEN }'
  [w8a8i8]='linear: QAT qat { weight_bits: 8 act_bits: 8 act_granularity: PER_TOKEN int8_forward: true }'
  [w4a8i8]='linear: QAT qat { weight_bits: 4 act_bits: 8 act_granularity: PER_TOKEN int8_forward: true }'
)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader

if ((tests)); then
  tools/gpu_tests.sh "$dist" || status=1
fi
if ((memcheck)); then
  # The model's own buffers (activation carving, workspaces) under compute-sanitizer.
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 97 "$dist/gpt_cuda_test" \
    --gtest_filter='-*TwentySteps*' >"$out/memcheck.log" 2>&1
  rc=$?
  echo "memcheck gpt_cuda_test: rc=$rc ($(grep -c 'Invalid' "$out/memcheck.log") invalid accesses)"
  ((rc == 0)) || status=1
fi

# shape -> "layers dim heads B" of the anchor (the job files hold the same shapes).
declare -A anchor_args=([124m]="12 768 12 16" [350m]="24 1024 16 8" [1558m]="48 1600 25 4")
shape_list=()
[[ -n "$shapes" ]] && IFS=, read -r -a shape_list <<<"$shapes"
for s in "${shape_list[@]}"; do
  echo "===== bench gpt2_$s" | tee -a "$out/bench.log"
  timeout 240 "$dist/bench" --job="configs/gpt2_$s.textproto" --steps="$steps" --warmup=5 \
    2>&1 | tee -a "$out/bench.log" || status=1
  prec_list=()
  [[ -n "$precisions" ]] && IFS=, read -r -a prec_list <<<"$precisions"
  for pn in "${prec_list[@]}"; do
    echo "===== bench gpt2_$s $pn: ${precision_of[$pn]}" | tee -a "$out/bench.log"
    timeout 240 "$dist/bench" --job="configs/gpt2_$s.textproto" --steps="$steps" --warmup=5 \
      --precision="${precision_of[$pn]}" 2>&1 | tee -a "$out/bench.log" || status=1
  done
  if ((run_anchor)) && [[ -f "$anchor" ]]; then
    read -r L D H B <<<"${anchor_args[$s]}"
    echo "===== anchor gpt2_$s: python3 torch_anchor.py --modes $anchor_modes --ceilings 0" \
         "--layers $L --dim $D --heads $H --B $B --T 1024 --steps $steps" | tee -a "$out/anchor.log"
    timeout 400 python3 "$anchor" --modes "$anchor_modes" --ceilings 0 --layers "$L" --dim "$D" \
      --heads "$H" --B "$B" --T 1024 --steps "$steps" 2>&1 | grep -v Warning |
      tee -a "$out/anchor.log" || status=1
  fi
done

if [[ -n "$train_dir" ]]; then
  e2e=/tmp/qtrain_e2e
  rm -rf "$e2e" && mkdir -p "$e2e"
  # The 124M job, short: 400 steps (warm-up 100), eval every 100 steps, checkpoints every 200.
  sed -e 's/^name: .*/name: "gpt2_124m_e2e"/' -e 's/^\(  steps:\) 10000/\1 400/' \
      -e 's/warmup_steps: 700/warmup_steps: 100/' -e 's/every_steps: 250/every_steps: 100/' \
      -e 's/batches: 20/batches: 10/' -e 's/every_steps: 1000/every_steps: 200/' \
      -e '/grad_accum:/a\  deterministic: true' \
      configs/gpt2_124m.textproto >"$e2e/job.textproto"
  qtrain="$(cd "$dist" && pwd)/qtrain"
  (cd "$train_dir" && timeout 200 "$qtrain" --job="$e2e/job.textproto" --out_dir="$e2e/a") \
    2>&1 | tee "$out/train.log" || status=1
  (cd "$train_dir" && timeout 120 "$qtrain" --job="$e2e/job.textproto" --out_dir="$e2e/b" \
     --resume="$e2e/a/checkpoints/step_00000200.safetensors") 2>&1 | tee -a "$out/train.log" ||
    status=1
  python3 - "$e2e/a/metrics.jsonl" "$e2e/b/metrics.jsonl" <<'PY' 2>&1 | tee -a "$out/train.log" || status=1
import json, sys
rows = [{r["step"]: r for r in map(json.loads, open(p))} for p in sys.argv[1:]]
a, b = rows
same = [s for s in range(201, 401) if s in a and s in b and a[s]["train_loss"] == b[s]["train_loss"]]
vl = {s: round(r["val_loss"], 4) for s, r in sorted(a.items()) if "val_loss" in r}
print("e2e: val loss by step", vl)
print("e2e: resumed run matches steps 201-400 exactly:", len(same), "of 200")
sys.exit(0 if len(same) == 200 and list(vl.values())[-1] < list(vl.values())[0] else 1)
PY
fi

if ((kernel_bench)); then
  timeout 120 "$dist/kernel_bench" 2>&1 | tee "$out/kernel_bench.log" || status=1
fi

echo "===== summary"
cat "$out/gpu_tests_summary.txt" 2>/dev/null
grep -h '^{' "$out/bench.log" "$out/anchor.log" 2>/dev/null
exit $status
