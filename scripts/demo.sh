#!/usr/bin/env bash
# The demo (`cxrgen demo`, docs/demo.md) from a fresh clone: builds the release binary, then runs
# the whole pipeline on phantoms on the CPU, with nothing to download.
#
#   scripts/demo.sh [DIR] [--quick]    # DIR defaults to demo/ (must not exist, or be empty)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=demo
if [[ $# -gt 0 && $1 != --* ]]; then
    dir=$1
    shift
fi
cargo build --release --quiet
exec target/release/cxrgen demo --out "$dir" "$@"
