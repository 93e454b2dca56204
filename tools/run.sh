#!/usr/bin/env bash
# Sets up this machine (tools/setup.sh: packages, Brown corpus, shards), builds qtrain and
# trains the default job (configs/tiny_cpu.textproto) on the CPU. Extra arguments go to
# qtrain, e.g. `tools/run.sh --steps=100` or `tools/run.sh --job=configs/other.textproto`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bazel build //trainer:qtrain
job=configs/tiny_cpu.textproto
for arg in "$@"; do
  case "$arg" in --job=*) job="${arg#--job=}" ;; esac
done
args=()
for arg in "$@"; do
  case "$arg" in --job=*) ;; *) args+=("$arg") ;; esac
done
exec bazel-bin/trainer/qtrain --job="$job" "${args[@]+"${args[@]}"}"
