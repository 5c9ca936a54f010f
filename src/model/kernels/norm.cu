// GroupNorm and LayerNorm forward in one kernel each, and the per-row statistics their backward
// pass recomputes (src/model/kernels/norm.rs describes the layout and the CPU twin).
//
// x is viewed as [rows, n] with n = channels_per_group * inner: row r holds channels
// (r % groups) * channels_per_group + j / inner for its elements j. GroupNorm: rows = B·G,
// inner = H·W; LayerNorm: groups = 1, channels_per_group = the normalised width, inner = 1.
// One block per row; statistics in F32 (two passes: the mean, then the centred variance).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void row_stats(const T *x, unsigned int n, float eps, float *scratch,
                                          float &mean, float &rstd) {
    float s = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) s += to_f32(x[j]);
    mean = block_sum(s, scratch) / (float)n;
    float q = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        const float d = to_f32(x[j]) - mean;
        q += d * d;
    }
    const float var = block_sum(q, scratch) / (float)n;
    rstd = rsqrtf(var + eps);
}

// y = act((x − mean) · rstd · w[c] + b[c]), act = SiLU when `silu` is non-zero, else identity.
template <typename T>
__device__ __forceinline__ void norm_fwd(const T *x, const T *w, const T *b, T *y,
                                         unsigned int groups, unsigned int channels_per_group,
                                         unsigned int inner, float eps, unsigned int silu) {
    __shared__ float scratch[32];
    const unsigned int n = channels_per_group * inner;
    const size_t row = blockIdx.x;
    x += row * n;
    y += row * n;
    float mean, rstd;
    row_stats(x, n, eps, scratch, mean, rstd);
    const unsigned int c0 = (unsigned int)(row % groups) * channels_per_group;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        const unsigned int c = c0 + j / inner;
        float v = (to_f32(x[j]) - mean) * rstd * to_f32(w[c]) + to_f32(b[c]);
        if (silu) v = v / (1.0f + expf(-v));
        y[j] = from_f32<T>(v);
    }
}

// stats[2r] = mean, stats[2r + 1] = 1 / sqrt(var + eps) of row r of x viewed as [rows, n].
template <typename T>
__device__ __forceinline__ void norm_stats(const T *x, float *stats, unsigned int n, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float mean, rstd;
    row_stats(x + row * n, n, eps, scratch, mean, rstd);
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

#define NORM_KERNELS(T, SUFFIX)                                                                   \
    extern "C" __global__ void norm_fwd_##SUFFIX(const T *x, const T *w, const T *b, T *y,       \
                                                 unsigned int groups,                             \
                                                 unsigned int channels_per_group,                 \
                                                 unsigned int inner, float eps,                   \
                                                 unsigned int silu) {                             \
        norm_fwd<T>(x, w, b, y, groups, channels_per_group, inner, eps, silu);                   \
    }                                                                                             \
    extern "C" __global__ void norm_stats_##SUFFIX(const T *x, float *stats, unsigned int n,     \
                                                   float eps) {                                   \
        norm_stats<T>(x, stats, n, eps);                                                          \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(__half, f16)
NORM_KERNELS(__nv_bfloat16, bf16)
