#!/usr/bin/env bash
# Runs mpi_collectives_check (GoogleTest under MPI) on 2 and on 3 ranks (3 > cores: a world
# that is not a power of two, and oversubscribed).
set -euo pipefail
# Bazel's files for one test process; the ranks would race on them (and overwrite this test's
# own XML report).
unset TEST_PREMATURE_EXIT_FILE XML_OUTPUT_FILE TEST_SHARD_STATUS_FILE GTEST_OUTPUT
check="$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}/tests/distributed/mpi_collectives_check"
mpirun_args=(--oversubscribe -x OMP_NUM_THREADS=1)
if ((EUID == 0)); then mpirun_args+=(--allow-run-as-root); fi
for np in 2 3; do
  echo "=== mpirun -np $np mpi_collectives_check"
  timeout 120 mpirun "${mpirun_args[@]}" -np "$np" "$check" || {
    echo "FAILED with $np ranks" >&2
    exit 1
  }
done
