#!/usr/bin/env bash
# One call on the GPU machine: every GPU test of a bundle (tools/gpu_tests.sh), then the
# training-step benchmark (//tools:bench) and the PyTorch anchor (torch_anchor.py --modes bf16)
# at the GPT-2 shapes, one after the other in the same call, logs under $OUT (or DIST/logs).
#
# Here:  tools/bundle.sh -o .device/dist --keep-server $(bazel query 'attr(tags, "\bgpu\b",
#          tests(//tests/...))') //tools:bench //ops/cuda:kernel_bench
#        mkdir -p .device/anchors && cp ../shared/anchors/torch_anchor.py .device/anchors/
# There: tests/gpu/gpu_session.sh [--dist .device/dist] [--anchor .device/anchors/torch_anchor.py]
#          [--shapes 124m,350m,1558m] [--no-tests] [--no-anchor] [--kernel-bench] [--memcheck]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

dist=.device/dist
anchor=.device/anchors/torch_anchor.py
shapes=124m,350m,1558m
tests=1
run_anchor=1
kernel_bench=0
memcheck=0
steps=30
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
    *) echo "gpu_session: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
out="${OUT:-$dist/logs}"
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
IFS=, read -r -a shape_list <<<"$shapes"
for s in "${shape_list[@]}"; do
  echo "===== bench gpt2_$s" | tee -a "$out/bench.log"
  timeout 240 "$dist/bench" --job="configs/gpt2_$s.textproto" --steps="$steps" --warmup=5 \
    2>&1 | tee -a "$out/bench.log" || status=1
  if ((run_anchor)) && [[ -f "$anchor" ]]; then
    read -r L D H B <<<"${anchor_args[$s]}"
    echo "===== anchor gpt2_$s: python3 torch_anchor.py --modes bf16 --ceilings 0 --layers $L" \
         "--dim $D --heads $H --B $B --T 1024 --steps $steps" | tee -a "$out/anchor.log"
    timeout 240 python3 "$anchor" --modes bf16 --ceilings 0 --layers "$L" --dim "$D" \
      --heads "$H" --B "$B" --T 1024 --steps "$steps" 2>&1 | grep -v Warning |
      tee -a "$out/anchor.log" || status=1
  fi
done

if ((kernel_bench)); then
  timeout 120 "$dist/kernel_bench" 2>&1 | tee "$out/kernel_bench.log" || status=1
fi

echo "===== summary"
cat "$out/gpu_tests_summary.txt" 2>/dev/null
grep -h '^{' "$out/bench.log" "$out/anchor.log" 2>/dev/null
exit $status
