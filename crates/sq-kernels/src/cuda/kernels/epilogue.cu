// The GEMM epilogue: INT32 accumulators [m, n] (row stride ldacc, e.g. the padded N of the
// cuBLASLt output) to the caller's output [m, n] (row stride ldo), operation by operation like
// sq_kernels::dequantize_acc and requantize:
//   y = ((float)acc * xs[i]) * ws[j] (+ bias[j])
// xs has a stride: 1 for per-token scales, 0 for one per-tensor scale (which lives on the
// device, e.g. written by sq_quantize_tensor_*). ws holds one scale per column (per-tensor
// weight scales are expanded at upload). Grid: x over column blocks, y over rows.

enum { SQ_OUT_I32 = 0, SQ_OUT_F32 = 1, SQ_OUT_I8 = 2, SQ_OUT_F16 = 3 };

template <int MODE>
__device__ void epilogue(const int* acc, long long ldacc, int m, int n, const float* xs,
                         int xs_stride, const float* ws, const float* bias, float inv_out,
                         void* out, long long ldo) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    for (long long i = blockIdx.y; i < m; i += gridDim.y) {
        const int a = acc[i * ldacc + j];
        const long long o = i * ldo + j;
        if (MODE == SQ_OUT_I32) {
            ((int*)out)[o] = a;
        } else {
            float y = (float)a * xs[i * xs_stride] * ws[j];
            if (bias) y = y + bias[j];
            if (MODE == SQ_OUT_F32) ((float*)out)[o] = y;
            if (MODE == SQ_OUT_I8) ((i8*)out)[o] = sq_requantize(y, inv_out);
            if (MODE == SQ_OUT_F16) ((sq_half*)out)[o] = sq_f16(y);
        }
    }
}

extern "C" __global__ void sq_epilogue_i32(const int* acc, long long ldacc, int m, int n,
                                           int* out, long long ldo) {
    epilogue<SQ_OUT_I32>(acc, ldacc, m, n, 0, 0, 0, 0, 0.0f, out, ldo);
}

extern "C" __global__ void sq_epilogue_f32(const int* acc, long long ldacc, int m, int n,
                                           const float* xs, int xs_stride, const float* ws,
                                           const float* bias, float* out, long long ldo) {
    epilogue<SQ_OUT_F32>(acc, ldacc, m, n, xs, xs_stride, ws, bias, 0.0f, out, ldo);
}

extern "C" __global__ void sq_epilogue_i8(const int* acc, long long ldacc, int m, int n,
                                          const float* xs, int xs_stride, const float* ws,
                                          const float* bias, float inv_out, i8* out,
                                          long long ldo) {
    epilogue<SQ_OUT_I8>(acc, ldacc, m, n, xs, xs_stride, ws, bias, inv_out, out, ldo);
}

extern "C" __global__ void sq_epilogue_f16(const int* acc, long long ldacc, int m, int n,
                                           const float* xs, int xs_stride, const float* ws,
                                           const float* bias, sq_half* out, long long ldo) {
    epilogue<SQ_OUT_F16>(acc, ldacc, m, n, xs, xs_stride, ws, bias, 0.0f, out, ldo);
}
