#!/usr/bin/env bash
# One prepared run on a GPU machine (under 8 minutes): the CUDA build of cxrgen against the CPU,
# its speed and its peak memory, as one table.
#
#   scripts/gpu-check.sh [PACK]      # PACK: made by scripts/build-cuda.sh (default: target/cuda/*.tar.xz)
#
# (1) check-device on the tiny and the paper config: VAE, U-Net, one training step's gradients
#     and a 10-step sample, CUDA against CPU;
# (2) bench: DDIM-50 per image at 256×256, batch 1 and 8, in F16 and F32; 3×3 convolutions
#     forward + backward, candle's against cxrgen's;
# (3) bench --train: the paper's training step (batch 4, accumulation 4) and its peak device
#     memory with F16 / BF16 / F32 and with and without gradient checkpointing; bench --train-vae:
#     the VAE's step (batch 16 × 2, and the paper's 32 × 1) in F16 with checkpointing;
# (4) the table, printed and written to $OUT/gpu-results.md (else target/gpu-check/), with the
#     raw JSON beside it. Copy it to docs/gpu-results.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
pack=${1:-$(ls "$repo"/target/cuda/cxrgen-cuda-*.tar.xz 2>/dev/null | head -1)}
[[ -f $pack ]] || { echo "gpu-check.sh: no CUDA pack; make one with scripts/build-cuda.sh" >&2; exit 1; }
out=${OUT:-$repo/target/gpu-check}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$pack"
cxrgen=$work/cxrgen-cuda/cxrgen

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" \
    || { echo "gpu-check.sh: nvidia-smi failed: no GPU here" >&2; exit 1; }
echo "== $(cat "$out/gpu.txt")"

run() { # name, timeout in s, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if ! timeout "$limit" "$@" > "$out/$name.json" 2> "$out/$name.log"; then
        echo "   failed or timed out (see $name.log):"
        tail -5 "$out/$name.log" | sed 's/^/   /'
        echo '{"failed": true}' > "$out/$name.json"
    fi
}

# (1) agreement
run check-tiny 120 "$cxrgen" check-device --config tiny --device cuda --json
run check-paper 180 "$cxrgen" check-device --config paper --device cuda --json

# (2) generation speed and memory
for p in f16 f32; do
    run "sample-$p" 150 "$cxrgen" bench --config paper --device cuda --precision "$p" \
        --batch-sizes 1,8 --steps 50 --repeats 10 --json
done

# convolution forward + backward: candle's conv_transpose2d input gradient against ours
run kernels 120 "$cxrgen" bench --config tiny --device cuda --precision f16 --batch-sizes 1 \
    --repeats 1 --kernels --json

# (3) training: the paper's run settings, each memory lever in turn
lever() { # name, precision, checkpointing
    printf 'base: paper\ntrain_diffusion:\n  run:\n    grad_checkpointing: %s\n' "$3" > "$work/$1.yaml"
    run "train-$1" 120 "$cxrgen" bench --config "$work/$1.yaml" --device cuda --precision "$2" \
        --batch-sizes 1 --repeats 1 --train --json
}
lever f16-ckpt f16 true
lever bf16-ckpt bf16 true
lever f32-ckpt f32 true
lever f16-plain f16 false
lever f32-plain f32 false

vae_lever() { # name, batch, accumulation, checkpointing
    printf 'base: paper\ntrain_vae:\n  run:\n    batch_size: %s\n    grad_accumulation: %s\n    grad_checkpointing: %s\n' \
        "$2" "$3" "$4" > "$work/vae-$1.yaml"
    run "train-vae-$1" 120 "$cxrgen" bench --config "$work/vae-$1.yaml" --device cuda --precision f16 \
        --batch-sizes 1 --repeats 1 --train-vae --json
}
vae_lever 16x2-ckpt 16 2 true
vae_lever 32x1-ckpt 32 1 true
vae_lever 16x2-plain 16 2 false

# (4) the table
python3 "$repo/scripts/gpu-table.py" "$out" | tee "$out/gpu-results.md"
