#!/usr/bin/env bash
# Makes target/phantom-vs-real.png (never committed: its real images are ../shared's): six phantoms (`cxrgen phantom`, one of each finding kind) above
# six real radiographs of the NIH ChestX-ray14 subset in ../shared/data/cxr-real (public release,
# no restriction on use; Wang et al., CVPR 2017).
#
#   scripts/contact-sheet.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/phantom-vs-real.png}
real=../shared/data/cxr-real
[ -f "$real/manifest.csv" ] || { echo "needs $real (the shared data folder)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo run --quiet -- phantom --out "$tmp/phantoms" --n 40 --size 256 --seed 3
# The first image of each kind, in a fixed order.
phantoms=()
for kind in normal cardiomegaly effusion pneumothorax consolidation; do
    uid=$(awk -F, -v k="$kind" 'NR > 1 && $(NF-3) == k { print $1; exit }' "$tmp/phantoms/indiana_reports.csv")
    phantoms+=("$(ls "$tmp"/phantoms/images/images_normalized/"${uid}"_*.png)")
done
uid=$(awk -F, 'NR > 1 && $(NF-3) == "effusion" { n++; if (n == 2) { print $1; exit } }' "$tmp/phantoms/indiana_reports.csv")
phantoms+=("$(ls "$tmp"/phantoms/images/images_normalized/"${uid}"_*.png)")
# Three normal and three pneumonia NIH images.
reals=()
while IFS= read -r img; do reals+=("$real/$img"); done < <(
    awk -F, '$1 == "nih" && $6 == "Normal" && n++ < 3 { print $4 }' "$real/manifest.csv"
    awk -F, '$1 == "nih" && $6 == "Pneumonia" && n++ < 3 { print $4 }' "$real/manifest.csv"
)
cargo run --quiet -- grid --cols 6 --tile 160 --out "$out" "${phantoms[@]}" "${reals[@]}"
echo "wrote $out"
