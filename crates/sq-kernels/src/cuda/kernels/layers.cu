// The decoder's non-GEMM operations on f32 activations (row-major), for the model forward on
// the GPU. They follow sq-model's CPU code operation by operation; reductions run in a
// different order, so results agree to rounding, not bit for bit.

// out[r] = table[tokens[r]] (one block per row).
extern "C" __global__ void sq_embed(const float* table, const unsigned int* tokens, int dim,
                                    float* out) {
    const long long r = blockIdx.x;
    const float* src = table + (long long)tokens[r] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) out[r * dim + c] = src[c];
}

// x[r] += table[row0 + r] (learned positions; one block per row).
extern "C" __global__ void sq_add_table_rows(float* x, const float* table, int dim,
                                             long long row0) {
    const long long r = blockIdx.x;
    const float* src = table + (row0 + r) * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) x[r * dim + c] += src[c];
}

// RMSNorm (layer_norm == 0): out = w * (x * 1/sqrt(mean(x^2) + eps));
// LayerNorm: out = (x - mean) * 1/sqrt(var + eps) * w (+ b). One block per row.
extern "C" __global__ void sq_norm(const float* x, int dim, const float* w, const float* b,
                                   float eps, int layer_norm, float* out) {
    const long long r = blockIdx.x;
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    const float n = (float)dim;
    if (layer_norm) {
        float s = 0.0f;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) s += xr[c];
        const float mean = sq_block_sum(s) / n;
        float v = 0.0f;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            const float d = xr[c] - mean;
            v += d * d;
        }
        const float rstd = 1.0f / sqrtf(sq_block_sum(v) / n + eps);
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            float y = (xr[c] - mean) * rstd * w[c];
            if (b) y = y + b[c];
            o[c] = y;
        }
    } else {
        float s = 0.0f;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) s += xr[c] * xr[c];
        const float rstd = 1.0f / sqrtf(sq_block_sum(s) / n + eps);
        for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = w[c] * (xr[c] * rstd);
    }
}

// Rotary embedding in place, Hugging Face rotate_half pairs (i, i + head_dim/2); row r is at
// position pos0 + r. Grid (rows, heads).
extern "C" __global__ void sq_rope(float* x, int heads, int head_dim, long long pos0,
                                   const float* inv_freq) {
    const long long r = blockIdx.x;
    const int h = blockIdx.y;
    const int half = head_dim / 2;
    float* base = x + (r * heads + h) * head_dim;
    const float pos = (float)(pos0 + r);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        const float a = base[i], b = base[i + half];
        base[i] = a * c - b * s;
        base[i + half] = b * c + a * s;
    }
}

#define ATT_WARPS 4
#define ATT_MAX_PER_LANE 8  // head_dim <= 256

// Causal attention of one query row and head over the cached keys/values of positions
// first..pos (pos = pos0 + row; first = pos + 1 - window with a sliding window), with an
// online softmax per warp, merged across the block's warps. q and out are [rows, heads * hd],
// keys and values [positions, kv_heads * hd]. alibi (nullable) adds slope[h] * key_position.
// Grid (rows, heads), block ATT_WARPS * 32.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
sq_attention(const float* q, const float* keys, const float* values, int heads, int kv_heads,
             int head_dim, long long pos0, float scale, long long window, const float* alibi,
             float* out) {
    __shared__ float s_max[ATT_WARPS], s_sum[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][ATT_MAX_PER_LANE * 32];
    const long long row = blockIdx.x;
    const int h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = h / (heads / kv_heads);
    const long long pos = pos0 + row;
    const long long first = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
    const long long kv_width = (long long)kv_heads * head_dim;
    const float* qh = q + (row * heads + h) * head_dim;
    const float slope = alibi ? alibi[h] : 0.0f;

    float qv[ATT_MAX_PER_LANE], acc[ATT_MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? qh[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -SQ_INFINITY, l = 0.0f;
    for (long long j = first + warp; j <= pos; j += ATT_WARPS) {
        const float* kj = keys + j * kv_width + (long long)kvh * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) dot += qv[i] * kj[d];
        }
        float s = sq_warp_sum(dot) * scale;
        if (alibi) s = s + slope * (float)j;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
        const float* vj = values + j * kv_width + (long long)kvh * head_dim;
#pragma unroll
        for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * corr + p * vj[d];
        }
        m = m_new;
    }
    if (lane == 0) {
        s_max[warp] = m;
        s_sum[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_MAX_PER_LANE; ++i) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float big = -SQ_INFINITY;
        for (int w = 0; w < ATT_WARPS; ++w) big = fmaxf(big, s_max[w]);
        float total = 0.0f, f[ATT_WARPS];
        for (int w = 0; w < ATT_WARPS; ++w) {
            // A warp that saw no key has m = -inf and l = 0: factor 0.
            f[w] = s_sum[w] > 0.0f ? expf(s_max[w] - big) : 0.0f;
            total += s_sum[w] * f[w];
        }
        const float inv = 1.0f / total;
        float* o = out + (row * heads + h) * head_dim;
#pragma unroll
        for (int i = 0; i < ATT_MAX_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) {
                float v = 0.0f;
                for (int w = 0; w < ATT_WARPS; ++w) v += s_acc[w][d] * f[w];
                o[d] = v * inv;
            }
        }
    }
}

enum { SQ_ACT_SILU = 0, SQ_ACT_RELU = 1, SQ_ACT_GELU_TANH = 2, SQ_ACT_GELU = 3 };

__device__ __forceinline__ float sq_activation(float v, int kind) {
    switch (kind) {
        case SQ_ACT_SILU:
            return v / (1.0f + expf(-v));
        case SQ_ACT_RELU:
            return fmaxf(v, 0.0f);
        case SQ_ACT_GELU_TANH:
            return 0.5f * v * (1.0f + tanhf(0.7978846f * v * (1.0f + 0.044715f * v * v)));
        default:
            return 0.5f * v * (1.0f + erff(v * 0.70710678f));
    }
}

// a = act(a), times u when given (gated MLP).
extern "C" __global__ void sq_activate(float* a, const float* u, long long n, int kind) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = sq_activation(a[i], kind);
        if (u) v = v * u[i];
        a[i] = v;
    }
}

// out = a + b (out may be a).
extern "C" __global__ void sq_add(float* out, const float* a, const float* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

// x *= s.
extern "C" __global__ void sq_scale(float* x, long long n, float s) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = x[i] * s;
}

// y[r][c] += bias[c] for y [rows, n].
extern "C" __global__ void sq_add_bias(float* y, const float* bias, long long rows, int n) {
    const long long total = rows * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        y[i] += bias[i % n];
}

// f32 -> f16, round to nearest even.
extern "C" __global__ void sq_to_f16(const float* x, sq_half* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = sq_f16(x[i]);
}

// BLOOM's fused query_key_value output, per head [q, k, v] of head_dim each, into q, k, v
// [rows, heads * head_dim]. Grid (rows, heads).
extern "C" __global__ void sq_split_qkv(const float* fused, int heads, int head_dim, float* q,
                                        float* k, float* v) {
    const long long r = blockIdx.x;
    const int h = blockIdx.y;
    const float* src = fused + (r * heads + h) * 3LL * head_dim;
    const long long dst = (r * heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        q[dst + d] = src[d];
        k[dst + d] = src[head_dim + d];
        v[dst + d] = src[2 * head_dim + d];
    }
}
