// Activation quantization on the GPU, bit-identical to sq_kernels::quantize (see its module
// docs for the definition). Inputs are row-major [m, k] with a row stride `ldx` (elements);
// outputs are INT8 rows of `ldq` >= k bytes whose padding columns k..ldq are written as 0, so
// the GEMM can read K rounded up to its alignment.

// Per-token (dynamic, one scale per row), optionally smoothed: q = requantize(x * factor, inv).
// One block per row.
template <typename T>
__device__ void quantize_rows(const T* x, long long ldx, int k, const float* factor, i8* q,
                              long long ldq, float* scales) {
    const long long row = blockIdx.x;
    const T* xr = x + row * ldx;
    i8* qr = q + row * ldq;
    float amax = 0.0f;
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        float v = sq_to_f32(xr[c]);
        if (factor) v = v * factor[c];
        amax = fmaxf(amax, fabsf(v));
    }
    amax = sq_block_max(amax);
    float scale, inv;
    sq_scale_for_absmax(amax, &scale, &inv);
    for (long long c = threadIdx.x; c < ldq; c += blockDim.x) {
        i8 out = 0;
        if (c < k) {
            float v = sq_to_f32(xr[c]);
            if (factor) v = v * factor[c];
            out = sq_requantize(v, inv);
        }
        qr[c] = out;
    }
    if (threadIdx.x == 0) scales[row] = scale;
}

extern "C" __global__ void sq_quantize_rows_f32(const float* x, long long ldx, int k,
                                                const float* factor, i8* q, long long ldq,
                                                float* scales) {
    quantize_rows(x, ldx, k, factor, q, ldq, scales);
}

extern "C" __global__ void sq_quantize_rows_f16(const sq_half* x, long long ldx, int k,
                                                const float* factor, i8* q, long long ldq,
                                                float* scales) {
    quantize_rows(x, ldx, k, factor, q, ldq, scales);
}

// Per-tensor absmax: max |x| over [m, k] into *amax_bits (the bits of a non-negative float,
// whose unsigned order is the float order; the caller zeroes it first). NaN is ignored.
template <typename T>
__device__ void absmax_tensor(const T* x, long long ldx, int m, int k, unsigned int* amax_bits) {
    float amax = 0.0f;
    const long long total = (long long)m * k;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / k, c = e - r * k;
        amax = fmaxf(amax, fabsf(sq_to_f32(x[r * ldx + c])));
    }
    amax = sq_block_max(amax);
    if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(amax));
}

extern "C" __global__ void sq_absmax_f32(const float* x, long long ldx, int m, int k,
                                         unsigned int* amax_bits) {
    absmax_tensor(x, ldx, m, k, amax_bits);
}

extern "C" __global__ void sq_absmax_f16(const sq_half* x, long long ldx, int m, int k,
                                         unsigned int* amax_bits) {
    absmax_tensor(x, ldx, m, k, amax_bits);
}

// Quantizes [m, k] with one scale: from the absmax bits written by sq_absmax_* (dynamic per
// tensor; the scale is also written to *scale_out), or from a fixed inverse scale when
// amax_bits is null (static: inv = 1 / scale, computed on the host like quantize_static).
template <typename T>
__device__ void quantize_tensor(const T* x, long long ldx, int m, int k,
                                const unsigned int* amax_bits, float static_inv, i8* q,
                                long long ldq, float* scale_out) {
    float inv = static_inv;
    if (amax_bits) {
        float scale;
        sq_scale_for_absmax(__uint_as_float(*amax_bits), &scale, &inv);
        if (blockIdx.x == 0 && threadIdx.x == 0 && scale_out) *scale_out = scale;
    }
    const long long total = (long long)m * ldq;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / ldq, c = e - r * ldq;
        q[e] = c < k ? sq_requantize(sq_to_f32(x[r * ldx + c]), inv) : (i8)0;
    }
}

extern "C" __global__ void sq_quantize_tensor_f32(const float* x, long long ldx, int m, int k,
                                                  const unsigned int* amax_bits,
                                                  float static_inv, i8* q, long long ldq,
                                                  float* scale_out) {
    quantize_tensor(x, ldx, m, k, amax_bits, static_inv, q, ldq, scale_out);
}

extern "C" __global__ void sq_quantize_tensor_f16(const sq_half* x, long long ldx, int m, int k,
                                                  const unsigned int* amax_bits,
                                                  float static_inv, i8* q, long long ldq,
                                                  float* scale_out) {
    quantize_tensor(x, ldx, m, k, amax_bits, static_inv, q, ldq, scale_out);
}
