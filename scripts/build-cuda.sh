#!/usr/bin/env bash
# Builds the CUDA binary of cxrgen on a machine WITHOUT CUDA installed, from NVIDIA's PyPI wheels
# (CUDA 13.0: nvcc, runtime, cuBLAS, cuRAND), and packs it for a GPU machine.
#
#   scripts/build-cuda.sh [--compute-cap 89] [--toolkit DIR] [--out FILE]
#
#   --compute-cap  the PTX target (default 89 = RTX 40xx; its PTX also JIT-compiles on H100/H200)
#   --toolkit      where the wheels are unpacked (default ~/.cache/cxrgen/cuda-13.0, ≈0.7 GB)
#   --out          the pack to write (default target/cuda/cxrgen-cuda-<version>-sm<cap>.tar.xz)
#
# The pack holds `cxrgen` (a launcher that finds the NVIDIA driver and the CUDA 13 runtime
# libraries, or says plainly which are missing) and `bin/cxrgen-cuda` (the stripped binary). On the
# GPU machine: `tar xf cxrgen-cuda-*.tar.xz && cxrgen-cuda/cxrgen info --device cuda`.
#
# Why a toolkit is assembled by hand: candle's kernels are compiled to PTX by nvcc at build time and
# the binary links libcudart/libcublas/libcublasLt/libcurand/libcuda dynamically. The driver library
# (libcuda.so.1) exists only where a driver is installed, so linking here uses a stub with the same
# symbols. The stub never leaves this machine: the pack does not contain it.
set -euo pipefail

cap=89
toolkit=${HOME}/.cache/cxrgen/cuda-13.0
out=
while [[ $# -gt 0 ]]; do
    case $1 in
        --compute-cap) cap=$2; shift 2 ;;
        --toolkit) toolkit=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "build-cuda.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $cap =~ ^[0-9]+$ ]] || { echo "build-cuda.sh: --compute-cap must be a number such as 89, not '$cap'" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
out=${out:-$repo/target/cuda/cxrgen-cuda-$version-sm$cap.tar.xz}
cu=$toolkit/nvidia/cu13

# 1. The toolkit: nvcc 13.0 (PTX ISA 9.0, accepted by driver 580) and the libraries to link.
if [[ ! -x $cu/bin/nvcc ]]; then
    echo "== fetching the CUDA 13.0 wheels into $toolkit"
    python3 -m pip install --quiet --no-deps --target "$toolkit" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
[[ -x $cu/bin/nvcc ]] || { echo "build-cuda.sh: no nvcc at $cu/bin/nvcc after installing the wheels" >&2; exit 1; }

# 2. The layout the build expects: lib64, unversioned .so names for the linker, a libcuda stub.
[[ -e $cu/lib64 ]] || ln -s lib "$cu/lib64"
for name in cudart cublas cublasLt nvrtc curand; do
    if [[ ! -e $cu/lib/lib$name.so ]]; then
        real=$(find "$cu/lib" -maxdepth 1 -name "lib$name.so.*" | sort | head -1)
        [[ -n $real ]] || { echo "build-cuda.sh: lib$name.so.* missing from $cu/lib" >&2; exit 1; }
        ln -s "$(basename "$real")" "$cu/lib/lib$name.so"
    fi
done
stub=$cu/lib/stubs/libcuda.so
if [[ ! -e $stub ]]; then
    echo "== making the link-time libcuda stub"
    mkdir -p "$cu/lib/stubs"
    # One function per driver entry point named in cuda.h (the plain names and the _v2/_v3 ones
    # its #defines map them to); each returns CUDA_ERROR_NO_DEVICE (100), so that a binary which
    # ever ran against the stub would report "no device" rather than crash.
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*' "$cu/include/cuda.h" | sort -u \
        | awk '{ printf "int %s(void) { return 100; }\n", $1 }' > "$cu/lib/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$cu/lib/stubs/libcuda.c"
fi

# 3. The build. Its own target folder, so the CPU build's artefacts stay valid.
echo "== cargo build --release --features cuda (sm_$cap; a cold build takes about 30 minutes on 2 cores)"
export CUDA_HOME=$cu CUDA_PATH=$cu CUDA_COMPUTE_CAP=$cap PATH=$cu/bin:$PATH
export LIBRARY_PATH=$cu/lib:$cu/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$cu/lib -L native=$cu/lib/stubs"
cargo build --manifest-path "$repo/Cargo.toml" --release --features cuda --target-dir "$repo/target/cuda"

# 4. The pack: stripped binary + launcher.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/cxrgen-cuda/bin"
cp "$repo/target/cuda/release/cxrgen" "$stage/cxrgen-cuda/bin/cxrgen-cuda"
strip "$stage/cxrgen-cuda/bin/cxrgen-cuda"
cp "$repo/scripts/cuda-launcher.sh" "$stage/cxrgen-cuda/cxrgen"
chmod +x "$stage/cxrgen-cuda/cxrgen" "$stage/cxrgen-cuda/bin/cxrgen-cuda"
mkdir -p "$(dirname "$out")"
tar -C "$stage" -cJf "$out.tmp" cxrgen-cuda
mv "$out.tmp" "$out"
echo "== packed $out ($(du -h "$out" | cut -f1)); needs at run time:"
readelf -d "$repo/target/cuda/release/cxrgen" | sed -n 's/.*Shared library: \[\(.*\)\]/   \1/p'
