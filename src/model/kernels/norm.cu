// GroupNorm and LayerNorm forward in one kernel each, and their backward pass in two
// (src/model/kernels/norm.rs describes the layout and has the CPU twin).
//
// x is viewed as [rows, n] with n = channels_per_group * inner: row r holds channels
// (r % groups) * channels_per_group + j / inner for its elements j. GroupNorm: rows = B·G,
// inner = H·W; LayerNorm: groups = 1, channels_per_group = the normalised width, inner = 1.
// One block per row; statistics in F32 (two passes: the mean, then the centred variance).
// With `tokens`, y (and in the backward pass its gradient g) has GroupNorm's output as tokens:
// [B, inner, C] instead of x's [B, C, inner].
#include "common.cuh"

// Where element j of row `row` of x sits in y (and g).
struct OutIndex {
    size_t row;
    unsigned int groups, channels_per_group, inner, tokens;

    __device__ __forceinline__ size_t operator()(unsigned int j) const {
        if (!tokens) return row * channels_per_group * inner + j;
        const unsigned int k = j / inner;
        const unsigned int s = j - k * inner;
        const unsigned int c = (unsigned int)(row % groups) * channels_per_group + k;
        return ((row / groups) * inner + s) * (size_t)(groups * channels_per_group) + c;
    }
};

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
                                         unsigned int inner, float eps, unsigned int silu,
                                         unsigned int tokens) {
    __shared__ float scratch[32];
    const unsigned int n = channels_per_group * inner;
    const size_t row = blockIdx.x;
    const OutIndex at{row, groups, channels_per_group, inner, tokens};
    x += row * n;
    float mean, rstd;
    row_stats(x, n, eps, scratch, mean, rstd);
    const unsigned int c0 = (unsigned int)(row % groups) * channels_per_group;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        const unsigned int c = c0 + j / inner;
        float v = (to_f32(x[j]) - mean) * rstd * to_f32(w[c]) + to_f32(b[c]);
        if (silu) v = v / (1.0f + expf(-v));
        y[at(j)] = from_f32<T>(v);
    }
}

// x̂ and the gradient reaching the pre-activation z = x̂ · w + b of an element x with output
// gradient g (through the SiLU when `silu`: silu'(z) = s · (1 + z · (1 − s)), s = sigmoid(z)).
__device__ __forceinline__ void grad_at(float x, float g, float w, float b, float mean, float rstd,
                                        unsigned int silu, float &x_hat, float &g_z) {
    x_hat = (x - mean) * rstd;
    g_z = g;
    if (silu) {
        const float z = x_hat * w + b;
        const float s = 1.0f / (1.0f + expf(-z));
        g_z *= s * (1.0f + z * (1.0f - s));
    }
}

// The backward pass of one row (block): dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) with
// ĝ = g_z · w, and the row's share of the parameter gradients: partial[k] = (Σ g_z · x̂, Σ g_z)
// over the elements of its channel k, as [rows, channels_per_group, 2] F32.
template <typename T>
__device__ __forceinline__ void norm_bwd(const T *x, const T *w, const T *b, const T *g, T *dx,
                                         float *partial, unsigned int groups,
                                         unsigned int channels_per_group, unsigned int inner,
                                         float eps, unsigned int silu, unsigned int tokens) {
    __shared__ float scratch[32];
    const unsigned int n = channels_per_group * inner;
    const size_t row = blockIdx.x;
    const OutIndex at{row, groups, channels_per_group, inner, tokens};
    x += row * n;
    dx += row * n;
    partial += row * channels_per_group * 2;
    float mean, rstd;
    row_stats(x, n, eps, scratch, mean, rstd);
    const unsigned int c0 = (unsigned int)(row % groups) * channels_per_group;
    float sum_gh = 0.0f, sum_gh_xh = 0.0f;
    float x_hat, g_z;
    if (inner == 1) {
        // One element per channel (LayerNorm): its share is the element's own terms.
        for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
            const float wc = to_f32(w[c0 + j]);
            grad_at(to_f32(x[j]), to_f32(g[at(j)]), wc, to_f32(b[c0 + j]), mean, rstd, silu, x_hat, g_z);
            sum_gh += g_z * wc;
            sum_gh_xh += g_z * wc * x_hat;
            partial[2 * j] = g_z * x_hat;
            partial[2 * j + 1] = g_z;
        }
    } else {
        // Channel by channel (GroupNorm): a block sum per channel.
        for (unsigned int k = 0; k < channels_per_group; ++k) {
            const float wc = to_f32(w[c0 + k]);
            const float bc = to_f32(b[c0 + k]);
            float s_w = 0.0f, s_b = 0.0f;
            for (unsigned int s = threadIdx.x; s < inner; s += blockDim.x) {
                const unsigned int j = k * inner + s;
                grad_at(to_f32(x[j]), to_f32(g[at(j)]), wc, bc, mean, rstd, silu, x_hat, g_z);
                s_w += g_z * x_hat;
                s_b += g_z;
            }
            sum_gh += s_b * wc;
            sum_gh_xh += s_w * wc;
            s_w = block_sum(s_w, scratch);
            s_b = block_sum(s_b, scratch);
            if (threadIdx.x == 0) {
                partial[2 * k] = s_w;
                partial[2 * k + 1] = s_b;
            }
        }
    }
    const float mean_gh = block_sum(sum_gh, scratch) / (float)n;
    const float mean_gh_xh = block_sum(sum_gh_xh, scratch) / (float)n;
    for (unsigned int j = threadIdx.x; j < n; j += blockDim.x) {
        const unsigned int c = c0 + j / inner;
        const float wc = to_f32(w[c]);
        grad_at(to_f32(x[j]), to_f32(g[at(j)]), wc, to_f32(b[c]), mean, rstd, silu, x_hat, g_z);
        dx[j] = from_f32<T>(rstd * (g_z * wc - mean_gh - x_hat * mean_gh_xh));
    }
}

// The parameter gradients from the rows' shares: partial viewed as [batch, channels, 2] (row
// b · groups + g holds channels g · channels_per_group ...), summed over the batch in F32:
// out[i · channels + c] = Σ_b partial[b][c][i], i = 0 for the weight, 1 for the bias. One block
// per output element.
template <typename T>
__device__ __forceinline__ void norm_param_grads(const float *partial, T *out, unsigned int batch,
                                                 unsigned int channels) {
    __shared__ float scratch[32];
    const unsigned int which = blockIdx.x / channels;
    const unsigned int c = blockIdx.x - which * channels;
    float s = 0.0f;
    for (unsigned int i = threadIdx.x; i < batch; i += blockDim.x)
        s += partial[((size_t)i * channels + c) * 2 + which];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = from_f32<T>(s);
}

#define NORM_KERNELS(T, SUFFIX)                                                                   \
    extern "C" __global__ void norm_fwd_##SUFFIX(const T *x, const T *w, const T *b, T *y,       \
                                                 unsigned int groups,                             \
                                                 unsigned int channels_per_group,                 \
                                                 unsigned int inner, float eps,                   \
                                                 unsigned int silu, unsigned int tokens) {        \
        norm_fwd<T>(x, w, b, y, groups, channels_per_group, inner, eps, silu, tokens);           \
    }                                                                                             \
    extern "C" __global__ void norm_bwd_##SUFFIX(                                                 \
        const T *x, const T *w, const T *b, const T *g, T *dx, float *partial,                   \
        unsigned int groups, unsigned int channels_per_group, unsigned int inner, float eps,     \
        unsigned int silu, unsigned int tokens) {                                                 \
        norm_bwd<T>(x, w, b, g, dx, partial, groups, channels_per_group, inner, eps, silu,       \
                    tokens);                                                                      \
    }                                                                                             \
    extern "C" __global__ void norm_param_grads_##SUFFIX(const float *partial, T *out,           \
                                                         unsigned int batch,                      \
                                                         unsigned int channels) {                 \
        norm_param_grads<T>(partial, out, batch, channels);                                       \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(__half, f16)
NORM_KERNELS(__nv_bfloat16, bf16)
