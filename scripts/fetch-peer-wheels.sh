#!/usr/bin/env bash
# The wheels scripts/torch-peer.py needs on the GPU machine, which has PyTorch 2.11 and no internet:
# downloaded here into .whl/ (ignored by git), carried there with the working tree, installed by
# scripts/gpu-check.sh into a temporary folder.
#
#   scripts/fetch-peer-wheels.sh
#
# What that machine lacks of diffusers' requirements: diffusers itself. Its other requirements
# are there (filelock, huggingface-hub ≥ 1.32 (1.33.0 there), numpy, Pillow, regex, requests,
# safetensors ≥ 0.8 (0.8.0 there)), except importlib_metadata, which diffusers imports only on
# Python < 3.8 (that machine runs 3.12), so it stays behind. One version of each wheel: pip
# refuses two.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
mkdir -p "$repo/.whl"
rm -f "$repo"/.whl/diffusers-*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$repo/.whl" "diffusers==$DIFFUSERS_VERSION"
ls -l "$repo"/.whl/*.whl
