#!/usr/bin/env bash
# One prepared run on a GPU machine (about 7 minutes): the CUDA build of cxrgen against the CPU,
# its speed and its peak memory, and the same rows of its PyTorch twins, as one table.
#
#   scripts/fetch-peer-wheels.sh     # once, where there is internet: diffusers into .whl/
#   scripts/gpu-check.sh [PACK]      # PACK: made by scripts/build-cuda.sh (default: target/cuda/*.tar.xz)
#
# (1) check-device on the tiny and the paper config: VAE, U-Net, one training step's gradients
#     and a 10-step sample, CUDA against CPU;
# (2) bench: DDIM-50 per image at 256×256, batch 1 and 8, in F16 (also with the guided step
#     replayed from a CUDA graph) and F32; 3×3 convolutions forward + backward, candle's against
#     cxrgen's;
# (3) bench --train: the paper's training step (batch 4, accumulation 4) and its peak device
#     memory with F16 / BF16 / F32 and with and without gradient checkpointing; bench --train-vae:
#     the VAE's step (batch 16 × 2, and the paper's 32 × 1) in F16 with checkpointing;
# (4) scripts/torch-peer.py: the same sampling and training rows for the diffusers twin of the
#     U-Net and the PyTorch twin of the VAE, eager and (sampling) under torch.compile; diffusers
#     is installed from .whl/ when it is there (the GPU machine has PyTorch but no internet);
# (5) the table, printed and written to $OUT/gpu-results.md (else target/gpu-check/), with the
#     raw JSON beside it, cxrgen / PyTorch ratios per row at its end. Copy it to docs/gpu-results.md.
#
# GPU_CHECK_DEVICE=cpu runs every step on the CPU instead: a dry run on a machine without a GPU
# (with a stand-in nvidia-smi and a pack of the CPU binary).
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

device=${GPU_CHECK_DEVICE:-cuda}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" \
    || { echo "gpu-check.sh: nvidia-smi failed: no GPU here" >&2; exit 1; }
echo "== $(cat "$out/gpu.txt")"

# diffusers for the PyTorch twins, from the wheels of scripts/fetch-peer-wheels.sh.
if compgen -G "$repo/.whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$work/site" "$repo"/.whl/*.whl > "$out/peer-install.log" 2>&1 \
        && export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
peer_missing=$(python3 -c 'import torch, diffusers; print(diffusers.__file__, file=__import__("sys").stderr)' \
    2>> "$out/peer-install.log" > /dev/null && echo || echo "no PyTorch with diffusers (see peer-install.log)")
echo "== PyTorch twins: ${peer_missing:-$(tail -1 "$out/peer-install.log")}"

# Every step has its own timeout, and all of them share one budget (GPU_CHECK_BUDGET_S, default
# 420 s, about 7 minutes): a step that would run past it gets what is left, and once nothing
# is left the remaining steps are skipped, so that the table is always written. The steps run in
# order of importance. @BUDGET@ in a command becomes the seconds it may use (its timeout less
# 10 s): torch-peer.py starts no row after that, and a step cut at its timeout keeps the JSON it
# printed when it was told to stop (SIGTERM).
budget=${GPU_CHECK_BUDGET_S:-420}
run() { # name, timeout in s, command...
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    if ((left < 15)); then
        echo "== $name: skipped (time budget spent)"
        echo '{"failed": true, "skipped": true}' > "$out/$name.json"
        return
    fi
    ((limit > left)) && limit=$left
    local cmd=("${@//@BUDGET@/$((limit - 10))}")
    echo "== $name (≤ ${limit} s): ${cmd[*]}"
    if ! timeout "$limit" "${cmd[@]}" > "$out/$name.json" 2> "$out/$name.log"; then
        echo "   failed or timed out (see $name.log):"
        tail -5 "$out/$name.log" | sed 's/^/   /'
        # check-device prints its whole table and then fails when a row is out of tolerance: keep it.
        python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$out/$name.json" 2> /dev/null \
            || echo '{"failed": true}' > "$out/$name.json"
    fi
}

lever() { # name, precision, checkpointing: the paper's diffusion step
    printf 'base: paper\ntrain_diffusion:\n  run:\n    grad_checkpointing: %s\n' "$3" > "$work/$1.yaml"
    run "train-$1" 120 "$cxrgen" bench --config "$work/$1.yaml" --device "$device" --precision "$2" \
        --batch-sizes 1 --repeats 1 --train --json
}
vae_lever() { # name, batch, accumulation, checkpointing: the paper's VAE step in F16
    printf 'base: paper\ntrain_vae:\n  run:\n    batch_size: %s\n    grad_accumulation: %s\n    grad_checkpointing: %s\n' \
        "$2" "$3" "$4" > "$work/vae-$1.yaml"
    run "train-vae-$1" 120 "$cxrgen" bench --config "$work/vae-$1.yaml" --device "$device" --precision f16 \
        --batch-sizes 1 --repeats 1 --train-vae --json
}
peer() { # name, timeout in s, torch-peer.py arguments: the PyTorch twins of the paper config
    local name=$1 limit=$2
    shift 2
    if [[ -n $peer_missing ]]; then
        echo "== $name: skipped ($peer_missing)"
        printf '{"failed": true, "why": "%s"}\n' "$peer_missing" > "$out/$name.json"
        return
    fi
    run "$name" "$limit" python3 "$repo/scripts/torch-peer.py" --cxrgen "$cxrgen" --config paper \
        --device "$device" --budget-s @BUDGET@ "$@"
}

# The headline figures first: agreement on the tiny config, DDIM-50 speed and memory in F16 and
# the same for the diffusers twin (eager), the paper's training step in F16 with checkpointing (its
# peak memory) and the VAE's, the twins' training steps, then the compiled twin's sampling step
# (compiling takes about 2 minutes).
run check-tiny 120 "$cxrgen" check-device --config tiny --device "$device" --json
run sample-f16 150 "$cxrgen" bench --config paper --device "$device" --precision f16 \
    --batch-sizes 1,8 --steps 50 --repeats 10 --cuda-graph --json
peer peer-sample-f16 90 --rows sample --precision f16 --batch-sizes 1,8 --repeats 30 --warmup 5
lever f16-ckpt f16 true
vae_lever 16x2-ckpt 16 2 true
peer peer-train-f16 120 --rows train,train-vae --precision f16 --checkpointing yes,no
peer peer-compiled-f16 240 --rows sample-compiled --precision f16 --batch-sizes 1,8 --repeats 30 \
    --compile-min-s 60
# Then agreement on the paper config, F32 sampling, the convolution kernels (candle's
# conv_transpose2d input gradient against ours), the other memory levers, the twins' F32 and BF16.
run check-paper 180 "$cxrgen" check-device --config paper --device "$device" --json
run sample-f32 150 "$cxrgen" bench --config paper --device "$device" --precision f32 \
    --batch-sizes 1,8 --steps 50 --repeats 10 --json
run kernels 120 "$cxrgen" bench --config tiny --device "$device" --precision f16 --batch-sizes 1 \
    --repeats 1 --kernels --json
lever bf16-ckpt bf16 true
lever f16-plain f16 false
vae_lever 32x1-ckpt 32 1 true
lever f32-ckpt f32 true
lever f32-plain f32 false
vae_lever 16x2-plain 16 2 false
peer peer-f32 90 --rows sample,train --precision f32 --batch-sizes 1,8 --checkpointing yes,no
peer peer-train-bf16 60 --rows train --precision bf16 --checkpointing yes

# (5) the table
python3 "$repo/scripts/gpu-table.py" "$out" | tee "$out/gpu-results.md"
