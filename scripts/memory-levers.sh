#!/usr/bin/env bash
# Peak memory and time of a training step for each memory lever (gradient checkpointing, batch ×
# accumulation), for both stages of the paper's model and of the tiny one, as a Markdown table.
#
#   scripts/memory-levers.sh [--device cpu|cuda] [--quick]
#
# Every row is one `cxrgen bench --train` (diffusion) or `--train-vae` run of the config's own
# step with the row's settings; its peak is the training steps' alone (RSS on the CPU, the CUDA
# pool's high-water mark on a GPU). About 5½ minutes on 2 CPU cores; --quick leaves out the
# paper VAE rows (4 of the 5½ minutes). CXRGEN=path/to/cxrgen uses that binary instead of building
# target/release/cxrgen.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cpu quick=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        *) echo "memory-levers.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
bin=${CXRGEN:-target/release/cxrgen}
[[ -n ${CXRGEN:-} ]] || cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

row() { # base, stage (train_diffusion|train_vae), batch, accumulation, checkpointing
    local name="$1-$2-$3x$4-$5"
    printf 'base: %s\n%s:\n  run:\n    batch_size: %s\n    grad_accumulation: %s\n    grad_checkpointing: %s\n' \
        "$1" "$2" "$3" "$4" "$5" > "$work/$name.yaml"
    local flag=--train
    [[ $2 == train_vae ]] && flag=--train-vae
    "$bin" bench --config "$work/$name.yaml" --device "$device" --batch-sizes 1 --repeats 1 \
        --steps 1 "$flag" --json > "$work/$name.json"
    echo "$1 $2 $3 $4 $5 $work/$name.json" >> "$work/rows"
}

row paper train_diffusion 4 1 false
row paper train_diffusion 4 1 true
if [[ $quick == 0 ]]; then
    row paper train_vae 4 1 false
    row paper train_vae 4 1 true
    row paper train_vae 8 1 true
fi
row tiny train_diffusion 16 1 false
row tiny train_diffusion 16 1 true
row tiny train_diffusion 4 4 false
row tiny train_diffusion 4 4 true

python3 - "$work/rows" <<'PY'
import json, sys
print("| model | stage | batch × accumulation | checkpointing | precision | peak MiB | ms per optimizer step |")
print("|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    base, stage, b, a, ckpt, path = line.split()
    r = json.load(open(path))
    t = r["training" if stage == "train_diffusion" else "training_vae"]
    print(f"| {base} | {stage.split('_')[1]} | {b} × {a} | {'yes' if ckpt == 'true' else 'no'} | "
          f"{t['precision']} | {t['peak_mib']:,.0f} | {t['ms_per_optimizer_step']:,.0f} |")
PY
