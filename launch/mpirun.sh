#!/usr/bin/env bash
# Starts a data-parallel qtrain job as NP MPI ranks on this machine (CPU ranks, or one rank per
# GPU for GPU jobs: each rank takes the GPU of its local rank).
#
# Usage: launch/mpirun.sh [qtrain flags...]
#   NP=4 JOB=configs/tiny_cpu.textproto launch/mpirun.sh --steps=200
#   launch/mpirun.sh --resume=latest --global_batch=16
# Every variable below can also be set in the environment. docs/launching.md explains them.
set -euo pipefail

# ---- edit here -------------------------------------------------------------------------------
NP="${NP:-2}"                                   # ranks on this machine
JOB="${JOB:-configs/tiny_cpu.textproto}"        # job spec
QTRAIN_BIN="${QTRAIN_BIN:-bazel-bin/trainer/qtrain}"  # built by: bazel build //trainer:qtrain
THREADS_PER_RANK="${THREADS_PER_RANK:-}"        # OpenMP threads per rank; empty: cores / NP
MPIRUN="${MPIRUN:-mpirun}"                      # OpenMPI's mpirun
MPIRUN_ARGS="${MPIRUN_ARGS:-}"                  # more mpirun flags, e.g. "--bind-to none"
# ----------------------------------------------------------------------------------------------

die() { echo "mpirun.sh: error: $*" >&2; exit 2; }

[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "NP must be a positive integer, got '$NP'"
[[ -f "$JOB" ]] || die "job spec '$JOB' not found (set JOB=path/to/job.textproto)"
[[ -x "$QTRAIN_BIN" ]] ||
  die "qtrain binary '$QTRAIN_BIN' not found or not executable (bazel build //trainer:qtrain;" \
      "set QTRAIN_BIN to \$(bazel info bazel-bin)/trainer/qtrain)"
command -v "$MPIRUN" >/dev/null 2>&1 || die "'$MPIRUN' not found (apt-get install openmpi-bin)"

cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc honours OMP_NUM_THREADS
if [[ -z "$THREADS_PER_RANK" ]]; then
  THREADS_PER_RANK=$((cores / NP))
  ((THREADS_PER_RANK >= 1)) || THREADS_PER_RANK=1
fi
export OMP_NUM_THREADS="$THREADS_PER_RANK"

args=(-np "$NP" -x OMP_NUM_THREADS)
# OpenMPI refuses to run as root unless told, and refuses more ranks than it counts slots
# (physical cores) unless told; add each flag only when it is needed.
if ((EUID == 0)); then args+=(--allow-run-as-root); fi
physical="$( (lscpu -p=CORE,SOCKET 2>/dev/null || true) | grep -v '^#' | sort -u | wc -l)"
((physical >= 1)) || physical="$cores"
if ((NP > physical)); then args+=(--oversubscribe); fi
# Several threads per rank need more than the one core OpenMPI binds each rank to.
if ((THREADS_PER_RANK > 1)); then args+=(--bind-to none); fi
# shellcheck disable=SC2206  # MPIRUN_ARGS is a list of words on purpose
if [[ -n "$MPIRUN_ARGS" ]]; then args+=($MPIRUN_ARGS); fi

echo "mpirun.sh: $NP ranks x $THREADS_PER_RANK threads: $QTRAIN_BIN --job=$JOB $*" >&2
exec "$MPIRUN" "${args[@]}" "$QTRAIN_BIN" --job="$JOB" --backend=mpi "$@"
