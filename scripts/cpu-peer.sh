#!/usr/bin/env bash
# cxrgen against its PyTorch twins (scripts/torch-peer.py) on the CPU, same thread count, one
# after the other: the guided DDIM step at batch 1, the VAE decode of one 256×256 image and the
# training micro-batch of 4 (F32, no checkpointing, with AdamW) of the paper config, as the
# cxrgen / PyTorch table of scripts/gpu-table.py (docs/performance.md).
#
#   scripts/cpu-peer.sh [THREADS] [ROUNDS]   # defaults 2 and 3; needs a release build and
#                                            # python3 with torch and diffusers (PYTHON=...)
#
# The two programs take turns, ROUNDS times, and each figure is the smallest of its rounds: on a
# machine shared with other work, the round with the least interference. Writes the raw JSON of
# every round and the table to $OUT (else target/cpu-peer/), with the CPU's name and the widest
# vectors cxrgen's kernels use on it (avx512, avx2 or baseline) under the table.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
threads=${1:-2}
rounds=${2:-3}
cxrgen=$repo/target/release/cxrgen
python=${PYTHON:-python3}
out=${OUT:-$repo/target/cpu-peer}
[[ -x $cxrgen ]] || { echo "cpu-peer.sh: no $cxrgen; run cargo build --release" >&2; exit 1; }
mkdir -p "$out"
export RAYON_NUM_THREADS=$threads # candle's threads
step() { # name, command...: its JSON to $out/name.json
    local name=$1
    shift
    echo "== $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) $name: $*" >&2
    "$@" > "$out/$name.json"
}
printf 'base: paper\ntrain_diffusion:\n  run:\n    grad_checkpointing: false\n' > "$out/f32-plain.yaml"
for r in $(seq 1 "$rounds"); do
    step "round$r-sample-f32" "$cxrgen" bench --config paper --device cpu --precision f32 \
        --batch-sizes 1 --steps 50 --repeats 3 --json
    step "round$r-peer-sample" "$python" "$repo/scripts/torch-peer.py" --cxrgen "$cxrgen" \
        --config paper --device cpu --threads "$threads" --rows sample --precision f32 \
        --batch-sizes 1 --repeats 3 --warmup 2
    step "round$r-train-f32-plain" "$cxrgen" bench --config "$out/f32-plain.yaml" --device cpu \
        --precision f32 --batch-sizes 1 --repeats 1 --train --json
    step "round$r-peer-train" "$python" "$repo/scripts/torch-peer.py" --cxrgen "$cxrgen" \
        --config paper --device cpu --threads "$threads" --rows train --precision f32 \
        --train-repeats 1 --checkpointing no
done
# Each step's smallest figures over the rounds, under the names gpu-table.py reads.
python3 - "$out" "$rounds" <<'EOF'
import json, pathlib, sys
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def smallest(rows):
    return {k: min(r[k] for r in rows) if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)
            else rows[0][k] for k in rows[0]}
for name, into in [("sample-f32", "sample-f32"), ("train-f32-plain", "train-f32-plain"),
                   ("peer-sample", "peer-sample-f32"), ("peer-train", "peer-train-f32")]:
    runs = [json.loads((out / f"round{r}-{name}.json").read_text()) for r in range(1, rounds + 1)]
    merged = dict(runs[0])
    for key in ["sampling", "training", "training_vae"]:
        if isinstance(runs[0].get(key), dict):
            merged[key] = smallest([r[key] for r in runs])
        elif runs[0].get(key):
            merged[key] = [smallest([r[key][i] for r in runs]) for i in range(len(runs[0][key]))]
    (out / f"{into}.json").write_text(json.dumps(merged, indent=1))
EOF
python3 "$repo/scripts/gpu-table.py" --ratios "$out" | tee "$out/cpu-peer.md"
# The ratios depend on the CPU's vector units (PyTorch's oneDNN and gemm's kernels both choose
# theirs at run time): name it with the table.
flags=" $(grep -m1 '^flags' /proc/cpuinfo) "
simd=baseline
[[ $flags == *" avx2 "* && $flags == *" fma "* ]] && simd=avx2
wide=$simd
for f in avx512f avx512bw avx512dq avx512vl; do [[ $flags == *" $f "* ]] || wide=; done
[[ $wide == avx2 ]] && simd=avx512
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), widest vectors: $simd" | tee -a "$out/cpu-peer.md"
