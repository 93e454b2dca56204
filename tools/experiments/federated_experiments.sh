#!/usr/bin/env bash
# Reproduces the federated section of docs/experiments.md on the CPU (2 cores, shared with
# builds: a round at SHAPE=small takes ~2 s, ~30 s at SHAPE=tiny; ROUNDS=30 SEEDS="7 8 9" at
# SHAPE=small, docs/experiments.md's run, took about 50 minutes):
#  - a small base model (SHAPE below) trained on a held-out genre mix (Brown a-g), and a W4 QAT
#    base from it;
#  - federated LoRA (r = 8, every block Linear) on the other 8 genres, one genre per client,
#    half of them sampled per round, through qtrain_ps and 2 pooled client processes
#    (launch/federated_sim.sh): FedSVD, FFA-LoRA and FedAvg-LoRA, without DP and with DP-SGD at
#    epsilon 6 (delta 1e-5), on each base: 12 federations per seed, server val loss every round;
#  - the server's aggregation time and bytes per client per round at the GPT-2 124M shape.
# Then tools/experiments/federated_summary.py writes the table and docs/figures/federated_*.svg.
# Usage: tools/experiments/federated_experiments.sh [OUT_DIR]   (default out/fed_experiments)
# Environment: SHAPE (small | tiny), ROUNDS (12), LOCAL_STEPS (10), LR (1e-2, local AdamW), BASE_STEPS (300), QAT_STEPS (100), EVAL_BATCHES (8), PROCS (2),
# SGD_ROUNDS (10) and SGD_LR (0.5) of the FedSVD = FFA-LoRA check under local SGD (step 2b),
# SEEDS (federation seeds, "7": client sampling, local batches, DP noise, LoRA A init; the bases
# are shared), RUNS (a subset, e.g. "fp_nodp_FEDSVD fp_dp_FFA_LORA"), QTRAIN_DATA_DIR (data/brown).
# Runs land in OUT_DIR/runs/s<seed>/<base>_<dp>_<rule>/rounds.jsonl; finished ones are skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-out/fed_experiments}
mkdir -p "$out"
out="$(cd "$out" && pwd)"
data=${QTRAIN_DATA_DIR:-$PWD/data/brown}
rounds=${ROUNDS:-12}
local_steps=${LOCAL_STEPS:-10}
lr=${LR:-1e-2}
base_steps=${BASE_STEPS:-300}
qat_steps=${QAT_STEPS:-100}
eval_batches=${EVAL_BATCHES:-8}
procs=${PROCS:-2}
sgd_rounds=${SGD_ROUNDS:-10}
sgd_lr=${SGD_LR:-0.5}
read -r -a seeds <<<"${SEEDS:-7}"
# Two threads for the bases; one per client process in the federations (PROCS processes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [[ -z "${SKIP_BUILD:-}" ]]; then
  bazel build //trainer:qtrain //distributed/ps:qtrain_ps //distributed/federated:qtrain_fed_client \
    //tools:fed_agg_bench >"$out/build.log" 2>&1 || { echo "build failed: see $out/build.log" >&2; exit 1; }
fi
bin=$PWD/bazel-bin

# Validation data of the clients' genres, interleaved 256 tokens at a time so that the first
# eval batches cover all eight genres.
genres=(h j k l m n p r)
python3 - "$data" "$out/val_clients.bin" "${genres[@]}" <<'PY'
import struct, sys
data, dest, genres = sys.argv[1], sys.argv[2], sys.argv[3:]
def read(p):
    b = open(p, "rb").read()
    n = struct.unpack("<256i", b[:1024])[2]
    return list(struct.unpack(f"<{n}H", b[1024:1024 + 2 * n]))
shards = [read(f"{data}/val_{g}.bin") for g in genres]
out, i = [], 0
while any(i < len(s) for s in shards):
    for s in shards:
        out.extend(s[i:i + 256])
    i += 256
hdr = [0] * 256
hdr[0], hdr[1], hdr[2] = 20240520, 1, len(out)
open(dest, "wb").write(struct.pack("<256i", *hdr) + struct.pack(f"<{len(out)}H", *out))
PY

# The model: SHAPE=small (default: 2 blocks, d = 64, T = 64, what a shared 2-core machine runs
# in an hour) or SHAPE=tiny (the default job's 4 blocks, d = 128, T = 128: about 8x the time).
if [[ ${SHAPE:-small} == tiny ]]; then
  model='model { n_layer: 4 n_embd: 128 n_head: 4 max_seq_len: 128 }'
  T=128
else
  model='model { n_layer: 2 n_embd: 64 n_head: 2 max_seq_len: 64 }'
  T=64
fi
# 1. The bases: full precision on genres a-g, then W4 (per-channel LSQ, weights only) from it.
if [[ ! -f "$out/base_fp/checkpoints/step_$(printf %08d "$base_steps").safetensors" ]]; then
  cat >"$out/base_fp.textproto" <<JOB
name: "base_fp" seed: 1337 out_dir: "$out/base_fp"
$model
data { train_pattern: "$data/train_[abcdefg].bin" val_pattern: "$data/val_[abcdefg].bin" }
optimizer { lr: 3e-3 }
schedule { warmup_steps: 30 }
training { steps: $base_steps batch_size: 16 seq_len: $T }
eval { every_steps: 100 batches: 8 }
checkpoint { every_steps: 0 keep_last: 1 }
logging { every_steps: 50 }
JOB
  "$bin/trainer/qtrain" --job="$out/base_fp.textproto" >"$out/base_fp.log" 2>&1 ||
    { echo "federated_experiments: the FP base failed: see $out/base_fp.log" >&2; exit 1; }
fi
base_fp="$out/base_fp/checkpoints/step_$(printf %08d "$base_steps").safetensors"
qat='precision { linear: QAT qat { weight_bits: 4 } }'
if [[ ! -f "$out/base_w4/checkpoints/step_$(printf %08d "$qat_steps").safetensors" ]]; then
  cat >"$out/base_w4.textproto" <<JOB
name: "base_w4" seed: 1337 out_dir: "$out/base_w4"
$model
$qat
data { train_pattern: "$data/train_[abcdefg].bin" val_pattern: "$data/val_[abcdefg].bin" }
optimizer { lr: 1e-3 }
schedule { warmup_steps: 10 }
training { steps: $qat_steps batch_size: 16 seq_len: $T init_from: "$base_fp" }
eval { every_steps: 50 batches: 8 }
checkpoint { every_steps: 0 keep_last: 1 }
logging { every_steps: 50 }
JOB
  "$bin/trainer/qtrain" --job="$out/base_w4.textproto" >"$out/base_w4.log" 2>&1 ||
    { echo "federated_experiments: the W4 base failed: see $out/base_w4.log" >&2; exit 1; }
fi
base_w4="$out/base_w4/checkpoints/step_$(printf %08d "$qat_steps").safetensors"

# 2. The federations.
export OMP_NUM_THREADS=1
run() {  # run BASE(fp|w4) DP(nodp|dp) AGGREGATION SEED [sgd]
  local name="$1_$2_$3" seed=$4 base precision="" dp="" opt="" run_lr=$lr run_rounds=$rounds
  if [[ ${5:-} == sgd ]]; then
    name="$1_$2_sgd_$3" opt="local_optimizer: SGD" run_lr=$sgd_lr run_rounds=$sgd_rounds
  fi
  local dir="$out/runs/s$seed/$name" sim="$out/sim/s$seed/$name"
  if [[ -n "${RUNS:-}" && " $RUNS " != *" $name "* ]]; then return; fi
  # Finished: round 0 (the base) and every round.
  if [[ -f "$dir/rounds.jsonl" ]] && (($(wc -l <"$dir/rounds.jsonl") > run_rounds)); then return; fi
  if [[ $1 == fp ]]; then base=$base_fp; else base=$base_w4; precision=$qat; fi
  if [[ $2 == dp ]]; then dp="dp_clip: 0.5 dp_epsilon: 6 dp_delta: 1e-5"; fi
  rm -rf "$dir" "$sim"
  mkdir -p "$(dirname "$dir")" "$(dirname "$sim")"
  cat >"$dir.textproto" <<JOB
name: "${name}_s$seed" seed: $seed out_dir: "$dir"
$model
$precision
data { train_pattern: "unused" val_pattern: "$out/val_clients.bin"
       genres: "h" genres: "j" genres: "k" genres: "l" genres: "m" genres: "n" genres: "p" genres: "r" }
optimizer { lr: $run_lr }
training { batch_size: 16 seq_len: $T }
eval { batches: $eval_batches }
lora { rank: 8 alpha: 16 base: "$base" }
federated { aggregation: $3 rounds: $run_rounds clients: 8 local_steps: $local_steps
            client_fraction: 0.5 min_clients: 2 client_train_pattern: "$data/train_{genre}.bin"
            eval_every_rounds: 1 $dp $opt }
JOB
  echo "federated_experiments: $name seed $seed"
  local t0=$SECONDS
  JOB="$dir.textproto" PROCS=$procs WORK="$sim" \
    PS_BIN="$bin/distributed/ps/qtrain_ps" CLIENT_BIN="$bin/distributed/federated/qtrain_fed_client" \
    launch/federated_sim.sh >"$dir.log" 2>&1 ||
    { echo "federated_experiments: $name seed $seed failed: see $dir.log" >&2; return 1; }
  echo "federated_experiments: $name seed $seed done in $((SECONDS - t0)) s"
}
failed=0
for seed in "${seeds[@]}"; do
  for b in fp w4; do
    for d in nodp dp; do
      for a in FEDSVD FFA_LORA FEDAVG_LORA; do run "$b" "$d" "$a" "$seed" || failed=1; done
    done
  done
done
# 2b. FedSVD's A stays in the span of the initial A (the rows of B A are combinations of A's), so
# with a rotation-invariant local optimizer (SGD) FedSVD and FFA-LoRA should give the same
# model every round; AdamW (per coordinate) is what can separate them. The check: both with SGD.
for a in FEDSVD FFA_LORA; do run fp nodp "$a" "${seeds[0]}" sgd || failed=1; done

# 3. Aggregation at the GPT-2 124M shape (r = 8, all four Linears of 12 blocks, 4 clients).
"$bin/tools/fed_agg_bench" --n_layer=12 --n_embd=768 --rank=8 --clients=4 --repeats=21 \
  >"$out/agg_bench.json"

python3 tools/experiments/federated_summary.py "$out"
exit "$failed"
