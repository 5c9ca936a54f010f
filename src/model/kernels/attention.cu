// Multi-head attention forward in one kernel: softmax(q kᵀ · scale + bias) v for every head,
// reading q, k and v straight from the projections' [B, L, heads · d] layout and writing the
// output in that layout (no head split or merge copies), with the online softmax of
// FlashAttention (Dao et al., 2022): the score matrix is never stored. Arithmetic in F32.
// src/model/kernels/attention.rs has the CPU twin.
//
// Grid: x = query tiles of ROWS rows, y = batch · heads. Block: ROWS warps, one query row each.
// Keys go through shared memory in tiles of 32, one key per lane: lane j scores key j of the
// tile, the warp takes the tile's maximum and sum with shuffles, and each lane accumulates the
// output elements t ≡ lane (mod 32) of its row. Head widths up to MAX_HEAD_DIM.
#include "common.cuh"

#define ROWS 8
#define TILE 32
#define MAX_HEAD_DIM 128
#define PER_LANE (MAX_HEAD_DIM / 32)

// bias: null, or [B, lk] F32 added to every score of batch b (0 for tokens, -1e9 for padding).
// Strides are in elements; the last dimension of q, k and v is contiguous.
// Dynamic shared memory: (TILE · (d | 1) + TILE · d + ROWS · d) floats.
template <typename T>
__device__ __forceinline__ void attention_fwd(
    const T *q, const T *k, const T *v, const float *bias, T *out, unsigned int lq,
    unsigned int lk, unsigned int heads, unsigned int d, unsigned long long q_batch,
    unsigned long long q_row, unsigned long long k_batch, unsigned long long k_row,
    unsigned long long v_batch, unsigned long long v_row, float scale) {
    extern __shared__ float smem[];
    // An odd row stride: lane j reading element t of key row j hits bank (j · ks + t) mod 32,
    // a different bank for every lane.
    const unsigned int ks = d | 1u;
    float *k_tile = smem;              // [TILE][ks]
    float *v_tile = k_tile + TILE * ks; // [TILE][d]
    float *q_rows = v_tile + TILE * d;  // [ROWS][d]

    const unsigned int lane = threadIdx.x & 31;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int b = blockIdx.y / heads;
    const unsigned int h = blockIdx.y - b * heads;
    const unsigned int i = blockIdx.x * ROWS + warp;
    // Warp-uniform: a warp past the last query row still loads tiles and meets every barrier.
    const bool valid = i < lq;

    const T *kb = k + b * k_batch + h * d;
    const T *vb = v + b * v_batch + h * d;
    const float *bias_b = bias ? bias + (size_t)b * lk : nullptr;
    float *qs = q_rows + warp * d;
    if (valid) {
        const T *qr = q + b * q_batch + i * q_row + h * d;
        for (unsigned int t = lane; t < d; t += 32) qs[t] = to_f32(qr[t]) * scale;
    }

    float m = -INFINITY; // running maximum of the row's scores
    float l = 0.0f;      // running sum of exp(score − m)
    float acc[PER_LANE];
#pragma unroll
    for (int u = 0; u < PER_LANE; ++u) acc[u] = 0.0f;

    for (unsigned int k0 = 0; k0 < lk; k0 += TILE) {
        const unsigned int n_keys = min((unsigned int)TILE, lk - k0);
        __syncthreads(); // the previous tile is consumed; q rows are written
        for (unsigned int e = threadIdx.x; e < n_keys * d; e += blockDim.x) {
            const unsigned int j = e / d;
            const unsigned int t = e - j * d;
            k_tile[j * ks + t] = to_f32(kb[(size_t)(k0 + j) * k_row + t]);
            v_tile[j * d + t] = to_f32(vb[(size_t)(k0 + j) * v_row + t]);
        }
        __syncthreads();
        if (valid) {
            float s = -INFINITY;
            if (lane < n_keys) {
                const float *kr = k_tile + lane * ks;
                float dot = 0.0f;
                for (unsigned int t = 0; t < d; ++t) dot += qs[t] * kr[t];
                s = dot + (bias_b ? bias_b[k0 + lane] : 0.0f);
            }
            // Lane 0 always holds a key, so the tile maximum and m_new are finite.
            const float m_new = fmaxf(m, warp_max(s));
            const float p = lane < n_keys ? expf(s - m_new) : 0.0f;
            const float correction = expf(m - m_new); // 0 on the first tile (m = −∞)
            l = l * correction + warp_sum(p);
#pragma unroll
            for (int u = 0; u < PER_LANE; ++u) acc[u] *= correction;
            for (unsigned int j = 0; j < n_keys; ++j) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
                const float *vr = v_tile + j * d;
#pragma unroll
                for (int u = 0; u < PER_LANE; ++u) {
                    const unsigned int t = lane + 32u * u;
                    if (t < d) acc[u] += pj * vr[t];
                }
            }
            m = m_new;
        }
    }
    if (valid) {
        T *o = out + ((size_t)b * lq + i) * ((size_t)heads * d) + (size_t)h * d;
        const float inv = 1.0f / l;
#pragma unroll
        for (int u = 0; u < PER_LANE; ++u) {
            const unsigned int t = lane + 32u * u;
            if (t < d) o[t] = from_f32<T>(acc[u] * inv);
        }
    }
}

#define ATTENTION_KERNEL(T, SUFFIX)                                                               \
    extern "C" __global__ void __launch_bounds__(ROWS * 32) attention_fwd_##SUFFIX(              \
        const T *q, const T *k, const T *v, const float *bias, T *out, unsigned int lq,          \
        unsigned int lk, unsigned int heads, unsigned int d, unsigned long long q_batch,          \
        unsigned long long q_row, unsigned long long k_batch, unsigned long long k_row,           \
        unsigned long long v_batch, unsigned long long v_row, float scale) {                      \
        attention_fwd<T>(q, k, v, bias, out, lq, lk, heads, d, q_batch, q_row, k_batch, k_row,  \
                         v_batch, v_row, scale);                                                  \
    }

ATTENTION_KERNEL(float, f32)
ATTENTION_KERNEL(__half, f16)
ATTENTION_KERNEL(__nv_bfloat16, bf16)
