#!/usr/bin/env bash
# Sets up this machine (tools/setup.sh) and runs every CPU test: the GoogleTest suites and the
# end-to-end run of the default job. GPU tests (tag `gpu`) run on a GPU machine through
# tools/gpu_tests.sh instead. Extra arguments go to `bazel test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# The end-to-end test trains on the Brown shards that setup.sh prepared.
bazel test --test_env=QTRAIN_DATA_DIR="${QTRAIN_DATA_DIR:-$PWD/data}/brown" "$@" //...
