#!/usr/bin/env bash
# Starts a private one-node Slurm cluster (slurm_cluster.sh), submits
# launch/slurm/train_single_node.sbatch with 2 tasks through `sbatch -W` (srun --mpi=pmix, and
# the mpirun variant) and launch/slurm/train_multi_node.sbatch shrunk to the one node, waits for
# each to finish, checks the final checkpoint and metrics, and stops the daemons by their pids
# (also on failure).
set -euo pipefail

ws="$TEST_SRCDIR/${TEST_WORKSPACE:-qtrain}"
qtrain="$ws/trainer/qtrain"
single="$ws/launch/slurm/train_single_node.sbatch"
multi="$ws/launch/slurm/train_multi_node.sbatch"
# shellcheck source=tests/distributed/slurm_cluster.sh
source "$ws/tests/distributed/slurm_cluster.sh"

fail() { echo "slurm_test: FAIL: $*" >&2; exit 1; }

# Unix socket paths are short: the cluster lives in /tmp, not under Bazel's deep TEST_TMPDIR.
cluster="$(mktemp -d /tmp/qtrain-slurm.XXXXXX)"
work="${TEST_TMPDIR:-$(mktemp -d)}/slurm_work"
cleanup() {
  local rc=$?
  # Jobs still queued or running die with slurmd; the daemons go by their own pids.
  slurm_cluster_stop
  if ((rc != 0)); then _sc_dump_logs; fi
  rm -rf "$cluster"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

mkdir -p "$work"
"$ws/tests/distributed/write_test_corpus" "$work/corpus"
write_job() {  # name -> job file path
  local name="$1"
  cat >"$work/$name.textproto" <<JOB
name: "$name"
seed: 7
out_dir: "$work/out_$name"
model { n_layer: 2 n_embd: 32 n_head: 4 max_seq_len: 32 }
data { train_pattern: "$work/corpus/train_*.bin" val_pattern: "$work/corpus/val_*.bin" }
optimizer { lr: 0.01 }
schedule { warmup_steps: 2 }
training { steps: 10 batch_size: 4 seq_len: 32 }
eval { every_steps: 5 batches: 2 }
checkpoint { every_steps: 5 keep_last: 2 }
distributed { timeout_s: 60 }
JOB
  echo "$work/$name.textproto"
}

slurm_cluster_start "$cluster" || fail "could not start the Slurm cluster"

# Three jobs, submitted at once (the 2-CPU node runs them one after the other); sbatch -W
# returns each job's exit code. JOB / QTRAIN_BIN / LAUNCHER reach the script through sbatch's
# default --export=ALL.
cd "$work"
declare -A pids
submit() {  # name script launcher [sbatch options...]
  local name="$1" script="$2" launcher="$3"
  shift 3
  JOB="$(write_job "$name")" QTRAIN_BIN="$qtrain" LAUNCHER="$launcher" \
    timeout 240 sbatch -W --time=5 --output="$work/$name.out" "$@" "$script" >"$work/$name.sbatch.log" 2>&1 &
  pids[$name]=$!
}
submit srun_single "$single" srun --ntasks=2
submit mpirun_single "$single" mpirun --ntasks=2
submit srun_multi "$multi" srun --nodes=1 --ntasks-per-node=2

status=0
for name in srun_single mpirun_single srun_multi; do
  rc=0
  wait "${pids[$name]}" || rc=$?
  echo "=== $name: sbatch -W exit $rc"
  cat "$work/$name.sbatch.log"
  cat "$work/$name.out" 2>/dev/null || echo "(no job output)"
  ckpt="$work/out_$name/checkpoints/step_00000010.safetensors"
  if ((rc != 0)); then
    echo "slurm_test: $name: the job failed (exit $rc)" >&2
    status=1
  elif [[ ! -s "$ckpt" ]]; then
    echo "slurm_test: $name: no final checkpoint $ckpt" >&2
    status=1
  elif [[ "$(wc -l <"$work/out_$name/metrics.jsonl")" != 10 ]]; then
    echo "slurm_test: $name: metrics.jsonl should have 10 rows (rank 0 alone writes)" >&2
    status=1
  fi
done
grep -q "data parallel: 2 ranks (MPI via srun)" "$work/srun_single.out" ||
  { echo "slurm_test: srun_single did not train on 2 srun ranks" >&2; status=1; }
grep -q "data parallel: 2 ranks (MPI via mpirun)" "$work/mpirun_single.out" ||
  { echo "slurm_test: mpirun_single did not train on 2 mpirun ranks" >&2; status=1; }
grep -q "data parallel: 2 ranks (MPI via srun)" "$work/srun_multi.out" ||
  { echo "slurm_test: srun_multi did not train on 2 srun ranks" >&2; status=1; }
((status == 0)) || fail "see above"
echo "slurm_test: PASS"
