#!/usr/bin/env bash
# Sourced by the end-to-end tests: sets QTRAIN_DATA_DIR to the Brown shards tools/setup.sh
# prepared, so that a plain `bazel test //...` finds them as tools/test.sh's --test_env does.
# An explicit QTRAIN_DATA_DIR wins; otherwise this file's runfiles link leads back to the
# source tree, whose data/brown is where setup.sh writes (data/ may itself be a link).
if [[ -z "${QTRAIN_DATA_DIR:-}" ]]; then
  _qt_src="$(readlink -f "${BASH_SOURCE[0]}")"
  QTRAIN_DATA_DIR="$(dirname "$(dirname "$_qt_src")")/data/brown"
  export QTRAIN_DATA_DIR
  unset _qt_src
fi
if [[ ! -f "$QTRAIN_DATA_DIR/mixed_train.bin" ]]; then
  echo "FAIL: no Brown shards in QTRAIN_DATA_DIR=$QTRAIN_DATA_DIR: run tools/setup.sh (or" \
       "tools/test.sh, which runs it), or pass --test_env=QTRAIN_DATA_DIR=<data>/brown" >&2
  exit 1
fi
