#!/usr/bin/env bash
# The whole pipeline on the CPU in a few minutes, with nothing to download: phantom radiographs →
# prepared cache → VAE → latent diffusion model → generated images, with the built-in tiny config.
#
#   scripts/demo.sh [DIR]        # DIR defaults to demo/ (replaced if it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-demo}
cargo build --release --quiet
bin=target/release/cxrgen
rm -rf "$dir"
mkdir -p "$dir"

$bin phantom --out "$dir/phantoms" --n 240 --size 64 --seed 0
$bin prepare --config tiny --iu "$dir/phantoms" --out "$dir/cache"
$bin train-vae --config tiny --data "$dir/cache" --out "$dir/vae" --max-steps 200
$bin train-diffusion --config tiny --data "$dir/cache" --vae "$dir/vae" --out "$dir/ldm" --max-steps 400
for prompt in "No acute cardiopulmonary abnormality." "Cardiomegaly." "Right pleural effusion." "Left pneumothorax."; do
    slug=$(echo "$prompt" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z-')
    $bin generate --checkpoint "$dir/ldm" --prompt "$prompt" --n 4 --steps 50 --out "$dir/samples/$slug"
done
$bin grid --cols 4 --tile 96 --out "$dir/samples.png" "$dir"/samples/*/cxr-*.png
echo "done: $dir/vae/loss.png, $dir/ldm/loss.png, $dir/samples.png (one row per prompt)"
