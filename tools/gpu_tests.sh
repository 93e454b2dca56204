#!/usr/bin/env bash
# Runs every GPU test binary of a bundle (tools/bundle.sh) on a machine with a GPU, one after
# the other, and prints one line per binary and a summary "N passed, M failed"; exits non-zero
# if any failed or none ran. Logs go to $OUT when it is set (the lent GPU machine), else to
# DIST/logs. A missing GPU fails the tests instead of skipping them (QTRAIN_REQUIRE_GPU=1).
#
# Usage: tools/gpu_tests.sh [DIST] [-- GTEST_ARGS...]
#   DIST            the bundle folder (default: dist)
#   GTEST_ARGS      passed to every binary, e.g. --gtest_filter=*Attention*
# Environment:
#   QTRAIN_TEST_TIMEOUT   seconds per binary (default 300)
#   QTRAIN_SANITIZE       a compute-sanitizer tool (memcheck, racecheck, ...): run each binary
#                         under it, failing on any error it reports
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dist=dist
if (($#)) && [[ "$1" != "--" ]]; then
  dist="$1"
  shift
fi
[[ "${1:-}" == "--" ]] && shift
gtest_args=("$@")

[[ -d "$dist" ]] || { echo "gpu_tests: no bundle at $dist (run tools/bundle.sh first)" >&2; exit 2; }
log_dir="${OUT:-$dist/logs}"
mkdir -p "$log_dir"
# Only a few files come back from the GPU machine: one log for all binaries, one summary.
suffix="${QTRAIN_SANITIZE:+_$QTRAIN_SANITIZE}"
log="$log_dir/gpu_tests$suffix.log"
summary="$log_dir/gpu_tests${suffix}_summary.txt"
: >"$log"
: >"$summary"

export QTRAIN_REQUIRE_GPU=1
# The PyTorch golden test (tests/gpu/torch_reference_test) runs this script where python3 has
# torch and safetensors; it skips otherwise.
if [[ -z "${QTRAIN_TORCH_GPT2:-}" ]] &&
   python3 -c 'import torch, safetensors' >/dev/null 2>&1; then
  export QTRAIN_TORCH_GPT2="$PWD/tools/reference/torch_gpt2.py"
fi
timeout_s="${QTRAIN_TEST_TIMEOUT:-300}"
wrap=()
if [[ -n "${QTRAIN_SANITIZE:-}" ]]; then
  command -v compute-sanitizer >/dev/null 2>&1 ||
    { echo "gpu_tests: QTRAIN_SANITIZE is set but compute-sanitizer is not on PATH" >&2; exit 2; }
  wrap=(compute-sanitizer --tool "$QTRAIN_SANITIZE" --error-exitcode 97)
fi

{
  echo "# gpu_tests $(date -u +%Y-%m-%dT%H:%M:%SZ) bundle: $dist"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
    echo "(nvidia-smi not available)"
  [[ -f "$dist/MANIFEST.txt" ]] && grep -E '^(built|commit):' "$dist/MANIFEST.txt"
} | tee -a "$summary"

passed=0
failed=0
failed_names=()
shopt -s nullglob
for bin in "$dist"/*_test; do
  [[ -x "$bin" ]] || continue
  name="$(basename "$bin")"
  start=$(date +%s.%N)
  echo "===== $name ${wrap[*]}" >>"$log"
  timeout "$timeout_s" "${wrap[@]}" "$bin" "${gtest_args[@]}" >>"$log" 2>&1
  rc=$?
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
  if ((rc == 0)); then
    passed=$((passed + 1))
    line="PASS $name (${secs} s)"
  else
    failed=$((failed + 1))
    failed_names+=("$name")
    why="rc=$rc"
    ((rc == 124)) && why="timed out after ${timeout_s} s"
    ((rc == 97)) && why="compute-sanitizer reported errors"
    # The failing test cases, from this binary's part of the log.
    cases=$(awk -v n="===== $name" 'index($0, n) == 1 { on = 1; next } /^===== / { on = 0 }
              on && /^\[  FAILED  \] [A-Za-z]/ && !/listed below/ { print $4 }' "$log" |
            sort -u | tr '\n' ' ')
    line="FAIL $name ($why, ${secs} s) ${cases}"
  fi
  echo "$line" | tee -a "$summary"
done

echo "$passed passed, $failed failed" | tee -a "$summary"
if ((passed + failed == 0)); then
  echo "gpu_tests: no *_test binaries in $dist" | tee -a "$summary" >&2
  exit 1
fi
((failed == 0))
