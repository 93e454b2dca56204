#!/usr/bin/env bash
# The command line as a user meets it: --help lists qtrain's flags, the tools print their usage
# without abseil's warning, `bazel run`'s working directory (BUILD_WORKING_DIRECTORY) is where
# relative paths point and the absolute out_dir is printed, bad values are refused naming the
# field, a finished run says so, and no tool overwrites its own input.
set -euo pipefail
bin="$PWD"
tmp="${TEST_TMPDIR:-/tmp}/cli_test"
rm -rf "$tmp"
mkdir -p "$tmp/work"
fail() { echo "FAIL: $*" >&2; exit 1; }
expect_fail() {  # expect_fail "text" cmd...: cmd must fail and print text
  local want="$1" out
  shift
  if out=$("$@" 2>&1); then fail "'$*' succeeded; expected an error with: $want"; fi
  [[ "$out" == *"$want"* ]] || fail "'$*' printed:
$out
expected: $want"
  echo "ok: $want"
}
tests/distributed/write_test_corpus "$tmp/work/corpus"
cat > "$tmp/work/job.textproto" <<'JOB'
name: "cli"
model { n_layer: 1 n_embd: 16 n_head: 2 }
data { train_pattern: "corpus/train_*.bin" val_pattern: "corpus/val_*.bin" }
optimizer { lr: 3e-3 }
schedule { warmup_steps: 2 }
training { steps: 4 batch_size: 2 seq_len: 16 }
eval { batches: 2 }
JOB

# --help lists the trainer's own flags.
help=$(trainer/qtrain --help 2>&1 || true)
for flag in --job --steps --set --resume --overwrite --allow_spec_change --global_batch; do
  [[ "$help" == *"$flag ("* ]] || fail "qtrain --help does not list $flag:
$help"
done
[[ "$help" != *"No flags matched"* ]] || fail "qtrain --help: No flags matched"
# Tools: usage on a missing flag, and --help, without abseil's warning.
for tool in export eval_export ptq prepare_data; do
  out=$(tools/$tool 2>&1 || true)
  out_help=$(tools/$tool --help 2>&1 || true)
  [[ "$out$out_help" != *"SetProgramUsageMessage() never called"* ]] || fail "$tool: abseil warning"
  [[ "$out_help" == *"Flags from tools/$tool.cc"* ]] || fail "$tool --help lists no flags: $out_help"
done
[[ "$(tools/export 2>&1 || true)" == *"usage: export --checkpoint="* ]] || fail "export prints no usage"
for pair in tools/tokenize:tools/tokenize.cc tools/logits:tools/logits.cc tools/decode:tools/decode.cc \
    distributed/ps/qtrain_ps:distributed/ps/server_main.cc \
    distributed/federated/qtrain_fed_client:distributed/federated/client_main.cc; do
  out_help=$(${pair%%:*} --help 2>&1 || true)
  [[ "$out_help" == *"Flags from ${pair#*:}"* ]] || fail "${pair%%:*} --help lists no flags: $out_help"
done
[[ "$(distributed/ps/qtrain_ps_cli --help 2>&1 || true)" == *"Flags from distributed/ps/cli_main.cc"* ]] ||
  fail "qtrain_ps_cli --help lists no flags"

# `bazel run` starts in the runfiles tree: relative job, data and out_dir paths mean the
# caller's directory, and the banner names the absolute out_dir.
(cd "$tmp" && BUILD_WORKING_DIRECTORY="$tmp/work" "$bin/trainer/qtrain" --job=job.textproto) \
  > "$tmp/run.log"
grep -q "out_dir $tmp/work/out/cli\$" "$tmp/run.log" || fail "banner lacks the absolute out_dir: $(head -1 "$tmp/run.log")"
[[ -f "$tmp/work/out/cli/checkpoints/step_00000004.safetensors" ]] || fail "no checkpoint under the caller's out/cli"
[[ ! -e "$tmp/out" ]] || fail "out_dir was created in the process's own directory"
# The tools too: decode's --shard and --out mean the caller's directory.
(cd "$tmp" && BUILD_WORKING_DIRECTORY="$tmp/work" "$bin/tools/decode" --tokenizer=bytes \
  --shard="$(cd "$tmp/work" && ls corpus/train_*.bin | head -1)" --count=10 --out=decoded.txt)
[[ -s "$tmp/work/decoded.txt" && ! -e "$tmp/decoded.txt" ]] || fail "decode did not write the caller's decoded.txt"
echo "ok: BUILD_WORKING_DIRECTORY"
cd "$tmp/work"

# Settings are never ignored.
expect_fail "training.steps: must be > 0, got -3" "$bin/trainer/qtrain" --job=job.textproto --steps=-3
expect_fail "schedule.warmup_steps: must be < training.steps 1, got 2" \
  "$bin/trainer/qtrain" --job=job.textproto --steps=1
expect_fail "--set=FIELD=VALUE changes any field" "$bin/trainer/qtrain" --job=job.textproto --steps=1
"$bin/trainer/qtrain" --job=job.textproto --steps=1 --set=schedule.warmup_steps=0 --out_dir=out/one \
  --quiet || fail "--set=schedule.warmup_steps=0 with --steps=1 did not run"
# --set repeats (abseil alone would keep only the last one), and a block's commas stay in it.
out=$("$bin/trainer/qtrain" --job=job.textproto --set=training.steps=2 --set schedule.warmup_steps=0 \
  --set='precision={linear: QAT, qat {weight_bits: 8, act_bits: 8}}' --set=eval.batches=1,logging.every_steps=1 \
  --out_dir=out/repeated)
[[ "$out" == *"2 steps"* ]] || fail "repeated --set: training.steps=2 was not applied: $out"
grep -q 'weight_bits: 8' out/repeated/job_spec.textproto && grep -q 'every_steps: 1' out/repeated/job_spec.textproto ||
  fail "repeated --set: the precision block or logging.every_steps was not applied: $(cat out/repeated/job_spec.textproto)"
echo "ok: --set"
expect_fail "precision.qat.weight_bits: is set but no Linear uses QAT" \
  "$bin/trainer/qtrain" --job=job.textproto --set='precision={linear: FP8 qat {weight_bits: 4}}'
head -c 300 "$bin/trainer/qtrain" > binary.textproto
expect_fail "binary.textproto: not a text protobuf" "$bin/trainer/qtrain" --job=binary.textproto

# A new run refuses another run's out_dir; a finished run says it is finished.
expect_fail "already holds another run (newest checkpoint step_00000004.safetensors). Continue that run with --resume=latest, or pass --overwrite" \
  "$bin/trainer/qtrain" --job=job.textproto
out=$("$bin/trainer/qtrain" --job=job.textproto --resume=latest)
[[ "$out" == *"is already finished"* && "$out" != *"done: "* ]] || fail "finished resume printed: $out"
echo "ok: finished run"
expect_fail "optimizer.lr: 0.003 -> 0.001 (changes every remaining update)" \
  "$bin/trainer/qtrain" --job=job.textproto --resume=latest --steps=4 --set=optimizer.lr=1e-3

# No tool overwrites its input, by its path or through a hard link.
ckpt=out/cli/checkpoints/step_00000004.safetensors
sum=$(md5sum < "$ckpt")
expect_fail "--out $ckpt is the input --checkpoint $ckpt" "$bin/tools/export" --checkpoint="$ckpt" --out="$ckpt"
ln "$ckpt" hardlink.safetensors
expect_fail "(the same file through a link)" "$bin/tools/export" --checkpoint="$ckpt" --out=hardlink.safetensors
[[ "$(md5sum < "$ckpt")" == "$sum" ]] || fail "the checkpoint changed"
echo "text" > notes.txt
mkdir -p shards && ln notes.txt shards/train_text.bin
expect_fail "is the input 'notes.txt'" "$bin/tools/prepare_data" --text_files=notes.txt --out_dir=shards
: > empty.txt
expect_fail "'empty.txt' holds no text (an empty file)" "$bin/tools/prepare_data" --text_files=empty.txt --out_dir=shards2
[[ ! -e shards2/train_text.bin ]] || fail "prepare_data wrote a shard of an empty file"

# ptq takes a full-precision checkpoint and says what to do with a QAT one.
sed -e 's/name: "cli"/name: "cli_qat"/' -e 's/^optimizer/precision { linear: QAT qat { weight_bits: 4 } }\noptimizer/' \
  job.textproto > qat.textproto
"$bin/trainer/qtrain" --job=qat.textproto --quiet
expect_fail "is a QAT checkpoint (precision.linear QAT, 4-bit weights" \
  "$bin/tools/ptq" --checkpoint=out/cli_qat/checkpoints/step_00000004.safetensors
echo "PASS"
