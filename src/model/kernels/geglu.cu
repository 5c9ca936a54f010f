// GEGLU (Shazeer 2020): y = a · gelu(gate) for h = [a | gate] along the last dimension, and its
// backward pass, each one elementwise kernel (src/model/kernels/geglu.rs has the CPU twin).
// h: [rows, 2·half], y and the output gradient g: [rows, half], all contiguous.
#include "common.cuh"

__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

// d/dx gelu(x) = Φ(x) + x · φ(x).
__device__ __forceinline__ float gelu_erf_grad(float x) {
    const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

// f(i, a) for every output element i (grid-stride), with a the index of its `a` in h (its gate
// is at a + half).
template <typename F>
__device__ __forceinline__ void for_each_output(unsigned long long total, unsigned int half, F f) {
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += stride) {
        const unsigned long long row = i / half;
        f(i, i + row * half); // row · 2·half + (i − row · half)
    }
}

template <typename T>
__device__ __forceinline__ void geglu_fwd(const T *h, T *y, unsigned long long total,
                                          unsigned int half) {
    for_each_output(total, half, [&](unsigned long long i, unsigned long long a) {
        y[i] = from_f32<T>(to_f32(h[a]) * gelu_erf(to_f32(h[a + half])));
    });
}

// dh = [g · gelu(gate) | g · a · gelu'(gate)].
template <typename T>
__device__ __forceinline__ void geglu_bwd(const T *h, const T *g, T *dh, unsigned long long total,
                                          unsigned int half) {
    for_each_output(total, half, [&](unsigned long long i, unsigned long long a) {
        const float gate = to_f32(h[a + half]);
        const float gi = to_f32(g[i]);
        dh[a] = from_f32<T>(gi * gelu_erf(gate));
        dh[a + half] = from_f32<T>(gi * to_f32(h[a]) * gelu_erf_grad(gate));
    });
}

#define GEGLU_KERNELS(T, SUFFIX)                                                                  \
    extern "C" __global__ void geglu_fwd_##SUFFIX(const T *h, T *y, unsigned long long total,    \
                                                  unsigned int half) {                            \
        geglu_fwd<T>(h, y, total, half);                                                          \
    }                                                                                             \
    extern "C" __global__ void geglu_bwd_##SUFFIX(const T *h, const T *g, T *dh,                 \
                                                  unsigned long long total, unsigned int half) {  \
        geglu_bwd<T>(h, g, dh, total, half);                                                      \
    }

GEGLU_KERNELS(float, f32)
GEGLU_KERNELS(__half, f16)
GEGLU_KERNELS(__nv_bfloat16, bf16)
