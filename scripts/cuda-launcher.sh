#!/usr/bin/env bash
# The `cxrgen` launcher inside the CUDA pack made by scripts/build-cuda.sh.
#
# The CUDA binary (bin/cxrgen-cuda) links the NVIDIA driver library and the CUDA 13 runtime
# libraries; started without them it would die in the dynamic loader with a cryptic message. This
# launcher finds them (the library path, the system's cache, a Python environment's nvidia-*
# wheels, /usr/local/cuda), or says which are missing and how to get them, then runs the binary.
set -euo pipefail

here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
bin=$here/bin/cxrgen-cuda
runtime_libs=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10)

# Is $1 loadable without help: in LD_LIBRARY_PATH or the system's library cache?
known() {
    local dir
    local path=${LD_LIBRARY_PATH:-}
    for dir in ${path//:/ }; do [[ -e $dir/$1 ]] && return 0; done
    ldconfig -p 2>/dev/null | grep -q "[[:space:]]$1 " && return 0
    return 1
}

if ! known libcuda.so.1; then
    echo "cxrgen (CUDA build): no NVIDIA driver on this machine (libcuda.so.1 not found)." >&2
    echo "Run it on a machine with an NVIDIA GPU and driver 580 or newer, or use the CPU build (cargo build --release)." >&2
    exit 1
fi

missing=()
for lib in "${runtime_libs[@]}"; do
    known "$lib" && continue
    found=
    for root in $(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null) \
        /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /opt /usr/lib; do
        [[ -d $root ]] || continue
        found=$(find "$root" -name "$lib" -print -quit 2>/dev/null || true)
        [[ -n $found ]] && break
    done
    # Last resort: the whole file system (a PyTorch environment in an unusual place).
    [[ -n $found ]] || found=$(find / -xdev -name "$lib" -not -path '*/stubs/*' -print -quit 2>/dev/null || true)
    if [[ -n $found ]]; then
        export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    else
        missing+=("$lib")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "cxrgen (CUDA build): the CUDA 13 runtime libraries ${missing[*]} were not found." >&2
    echo "Install them with: pip install nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35" >&2
    echo "or put the folder that holds them on LD_LIBRARY_PATH." >&2
    exit 1
fi

exec "$bin" "$@"
