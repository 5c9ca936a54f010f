// y = x + b + r: a layer's output, its per-channel bias and a residual, in one elementwise kernel
// (src/model/kernels/bias.rs has the CPU twin). r and y contiguous with the same shape; b has one
// value per channel, channel c of element i being (i / inner) mod channels. x has y's layout, or
// with `tokens` the transposed one of a feature map as tokens: y [B, C, inner], x [B, inner, C].
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void bias_residual(const T *x, const T *b, const T *r, T *y,
                                              unsigned long long total, unsigned int channels,
                                              unsigned long long inner, unsigned int tokens) {
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += stride) {
        const unsigned long long run = i / inner; // b · channels + c
        const unsigned int c = (unsigned int)(run % channels);
        const unsigned long long at =
            tokens ? ((run / channels) * inner + (i - run * inner)) * channels + c : i;
        y[i] = from_f32<T>(to_f32(x[at]) + to_f32(b[c]) + to_f32(r[i]));
    }
}

#define BIAS_KERNELS(T, SUFFIX)                                                                   \
    extern "C" __global__ void bias_residual_##SUFFIX(const T *x, const T *b, const T *r, T *y,  \
                                                      unsigned long long total,                   \
                                                      unsigned int channels,                      \
                                                      unsigned long long inner,                   \
                                                      unsigned int tokens) {                      \
        bias_residual<T>(x, b, r, y, total, channels, inner, tokens);                             \
    }

BIAS_KERNELS(float, f32)
BIAS_KERNELS(__half, f16)
BIAS_KERNELS(__nv_bfloat16, bf16)
