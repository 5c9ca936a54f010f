#!/usr/bin/env bash
# cxrgen against its PyTorch twins (scripts/torch-peer.py) on the CPU, same thread count, one
# after the other: the guided DDIM step at batch 1, the VAE decode of one 256×256 image and the
# training micro-batch of 4 (F32, no checkpointing, with AdamW) of the paper config, as the
# cxrgen / PyTorch table of scripts/gpu-table.py (docs/performance.md).
#
#   scripts/cpu-peer.sh [THREADS]      # default 2; needs a release build and python3 with
#                                      # torch and diffusers (PYTHON=... to name another)
#
# Writes the raw JSON and the table to $OUT (else target/cpu-peer/).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
threads=${1:-2}
cxrgen=$repo/target/release/cxrgen
python=${PYTHON:-python3}
out=${OUT:-$repo/target/cpu-peer}
[[ -x $cxrgen ]] || { echo "cpu-peer.sh: no $cxrgen; run cargo build --release" >&2; exit 1; }
mkdir -p "$out"
export RAYON_NUM_THREADS=$threads # candle's threads
step() { # name, command...: its JSON to $out/name.json
    local name=$1
    shift
    echo "== $name: $*" >&2
    "$@" > "$out/$name.json"
}
step sample-f32 "$cxrgen" bench --config paper --device cpu --precision f32 --batch-sizes 1 \
    --steps 50 --repeats 5 --json
printf 'base: paper\ntrain_diffusion:\n  run:\n    grad_checkpointing: false\n' > "$out/f32-plain.yaml"
step train-f32-plain "$cxrgen" bench --config "$out/f32-plain.yaml" --device cpu --precision f32 \
    --batch-sizes 1 --repeats 1 --train --json
step peer-f32 "$python" "$repo/scripts/torch-peer.py" --cxrgen "$cxrgen" --config paper --device cpu \
    --threads "$threads" --rows sample,train --precision f32 --batch-sizes 1 --repeats 5 \
    --warmup 2 --train-repeats 1 --checkpointing no
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 "$repo/scripts/gpu-table.py" --ratios "$out" | tee "$out/cpu-peer.md"
