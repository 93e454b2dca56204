#!/usr/bin/env bash
# Builds Bazel binaries/tests here and packs them, with every shared library a CUDA node may
# lack (abseil, protobuf, gRPC, glog, libgomp, Bazel's own solibs, ...), into one folder that
# runs on a machine with only the NVIDIA driver, the CUDA runtime/cuBLAS/cuDNN, NCCL and MPI.
# Build once here, copy the folder to the nodes (docs/cuda.md).
#
# Usage: tools/bundle.sh [-o DIR] [--output_base PATH] [--strip] [--keep-server] [TARGET...]
#   TARGET...       Bazel labels of cc_binary/cc_test targets (default: every test tagged
#                   "gpu" under //tests/...)
#   -o DIR          the bundle folder (default: dist; replaced as a whole)
#   --output_base   Bazel --output_base (default: $QTRAIN_BAZEL_OUTPUT_BASE, else Bazel's own)
#   --strip         strip debug info from the copies (smaller bundle, no line numbers)
#   --keep-server   leave the Bazel server running (default: shut it down at the end)
#
# Layout: DIR/<binary> with RUNPATH $ORIGIN/lib:/usr/local/cuda/lib64, DIR/lib/<soname> with
# RUNPATH $ORIGIN, DIR/MANIFEST.txt. Left out (the node provides them): glibc, libstdc++,
# libgcc_s, the driver (libcuda, libnvidia-*), libcudart, libcublas*, libcusolver (with its
# libcusparse and libnvJitLink), libcudnn*, NCCL and MPI.
# Without patchelf (or with QTRAIN_BUNDLE_WRAPPERS=1) each binary becomes a wrapper script that
# sets LD_LIBRARY_PATH and runs DIR/.bin/<binary>.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "bundle: error: $*" >&2; exit 1; }
log() { echo "bundle: $*"; }

out_dir=dist
output_base="${QTRAIN_BAZEL_OUTPUT_BASE:-}"
strip_debug=0
keep_server=0
targets=()
while (($#)); do
  case "$1" in
    -o) [[ $# -ge 2 ]] || die "-o needs a folder"; out_dir="$2"; shift 2 ;;
    --output_base=*) output_base="${1#*=}"; shift ;;
    --output_base) [[ $# -ge 2 ]] || die "--output_base needs a path"; output_base="$2"; shift 2 ;;
    --strip) strip_debug=1; shift ;;
    --keep-server) keep_server=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    -*) die "unknown option '$1' (try --help)" ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ -n "$out_dir" && "$out_dir" != "/" ]] || die "refusing to use '$out_dir' as the bundle folder"

startup=()
[[ -n "$output_base" ]] && startup=(--output_base="$output_base")
bazel_() { bazel "${startup[@]}" "$@"; }
command -v bazel >/dev/null 2>&1 || die "bazel not found (tools/setup.sh installs it)"
shutdown_server() { ((keep_server)) || bazel_ shutdown >/dev/null 2>&1 || true; }
trap shutdown_server EXIT

if ((${#targets[@]} == 0)); then
  log "no targets given: every test tagged gpu under //tests/..."
  mapfile -t targets < <(bazel_ query --keep_going 'attr(tags, "\bgpu\b", tests(//tests/...))' \
                         2>/dev/null | sort)
  ((${#targets[@]})) || die "bazel query found no gpu-tagged tests under //tests/..."
fi

log "building ${#targets[@]} target(s)"
bazel_ build --symlink_prefix=/ "${targets[@]}" || die "bazel build failed"
bin_root="$(bazel_ info bazel-bin 2>/dev/null)" || die "bazel info bazel-bin failed"

# Libraries every CUDA node has (or must take from its own installation, like MPI).
excluded='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libutil\.so|libstdc\+\+\.so|libgcc_s\.so|libcuda\.so|libnvidia-|libcudart\.so|libcublas|libcusolver|libcusparse|libnvJitLink|libcudnn|libnccl\.so|libmpi|libopen-rte\.so|libopen-pal\.so|libhwloc\.so|libevent|libudev\.so|libpmix|libz\.so)'

stage="${out_dir%/}.tmp.$$"
rm -rf "$stage"
mkdir -p "$stage/lib"
stage="$(cd "$stage" && pwd)"  # absolute, as ldd prints paths
cleanup_stage() { rm -rf "$stage"; shutdown_server; }
trap cleanup_stage EXIT

binaries=()
declare -A lib_src=()
for t in "${targets[@]}"; do
  label="${t#@}"
  label="${label#//}"
  if [[ "$label" == *:* ]]; then
    rel="${label%%:*}/${label#*:}"
  else
    rel="$label/${label##*/}"  # //foo/bar means //foo/bar:bar
  fi
  rel="${rel#/}"
  src="$bin_root/$rel"
  [[ -f "$src" && -x "$src" ]] || die "$t: no executable at $src (only cc_binary/cc_test targets can be bundled)"
  name="$(basename "$rel")"
  [[ ! -e "$stage/$name" ]] || die "two targets are named $name; bundle them separately"
  cp -L "$src" "$stage/$name"
  chmod u+w "$stage/$name"
  binaries+=("$name")
  # ldd lists the whole closure; "not found" here would be missing on the node too.
  while read -r soname arrow path _; do
    [[ "$arrow" == "=>" ]] || continue
    [[ "$path" != "not" ]] || die "$t needs $soname, which is not found here either"
    [[ "$soname" =~ $excluded ]] && continue
    lib_src["$soname"]="$path"
  done < <(ldd "$src")
done

for soname in "${!lib_src[@]}"; do
  cp -L "${lib_src[$soname]}" "$stage/lib/$soname"
  chmod u+w "$stage/lib/$soname"
done

if ((strip_debug)); then
  strip --strip-debug "${binaries[@]/#/$stage/}" "$stage"/lib/*.so* 2>/dev/null || true
fi

if [[ -z "${QTRAIN_BUNDLE_WRAPPERS:-}" ]] && command -v patchelf >/dev/null 2>&1; then
  for b in "${binaries[@]}"; do
    patchelf --set-rpath '$ORIGIN/lib:/usr/local/cuda/lib64' "$stage/$b"
  done
  for l in "$stage"/lib/*; do
    [[ -e "$l" ]] || continue
    patchelf --set-rpath '$ORIGIN:/usr/local/cuda/lib64' "$l"
  done
  mode="rpath"
else
  [[ -n "${QTRAIN_BUNDLE_WRAPPERS:-}" ]] ||
    log "patchelf not found (apt-get install patchelf): writing wrapper scripts instead"
  mkdir -p "$stage/.bin"
  for b in "${binaries[@]}"; do
    mv "$stage/$b" "$stage/.bin/$b"
    cat >"$stage/$b" <<EOF
#!/usr/bin/env bash
# Runs .bin/$b with the bundle's libraries first on the search path.
here="\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)"
export LD_LIBRARY_PATH="\$here/lib:/usr/local/cuda/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$here/.bin/$b" "\$@"
EOF
    chmod +x "$stage/$b"
  done
  mode="wrapper"
fi

# Check: every library a binary needs that is not left to the node now comes from the bundle.
for b in "${binaries[@]}"; do
  bin_path="$stage/$b"
  [[ "$mode" == "wrapper" ]] && bin_path="$stage/.bin/$b"
  while read -r soname arrow path _; do
    [[ "$arrow" == "=>" ]] || continue
    [[ "$soname" =~ $excluded ]] && continue
    case "$path" in
      "$stage"/lib/*) ;;
      *) [[ "$mode" == "wrapper" ]] || die "$b resolves $soname to $path, outside the bundle" ;;
    esac
  done < <(LD_LIBRARY_PATH="$([[ "$mode" == "wrapper" ]] && echo "$stage/lib")" ldd "$bin_path")
done

{
  echo "# qtrain bundle: binaries with RUNPATH \$ORIGIN/lib ($mode mode)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
  echo "targets:"
  printf '  %s\n' "${targets[@]}"
  echo "binaries:"
  printf '  %s\n' "${binaries[@]}"
  echo "libraries:"
  (cd "$stage/lib" && ls -1 | sed 's/^/  /')
  echo "left to the node: glibc, libstdc++, libgcc_s, the NVIDIA driver, libcudart, cuBLAS, cuSOLVER (+ cuSPARSE, nvJitLink), cuDNN, NCCL, MPI"
} >"$stage/MANIFEST.txt"

rm -rf "$out_dir"
mv "$stage" "$out_dir"
trap shutdown_server EXIT
size="$(du -sm "$out_dir" | cut -f1)"
log "wrote $out_dir: ${#binaries[@]} binaries, ${#lib_src[@]} libraries, ${size} MiB"
if ((size > 60)); then
  log "warning: over 60 MiB; the GPU machine takes at most 64 MiB with the tree (try --strip)"
fi
