// Shared by every kernel file: the program NVRTC compiles is this header followed by each .cu
// file (with a #line directive, so errors name the file and line they come from).
//
// The program is compiled with --fmad=false: no multiply-add is contracted into an FMA, so
// the epilogues and quantizers round exactly like the CPU backends (which never fuse either).

typedef signed char i8;

// IEEE binary16, converted with the PTX cvt instructions: no header needed, so NVRTC compiles
// the program without a CUDA include directory.
struct __align__(2) sq_half {
    unsigned short bits;
};

__device__ __forceinline__ float sq_to_f32(float v) { return v; }
__device__ __forceinline__ float sq_to_f32(sq_half v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ sq_half sq_f16(float v) {
    sq_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}

#define SQ_FULL_MASK 0xffffffffu
#define SQ_INFINITY __int_as_float(0x7f800000)

// sq_kernels::requantize: y * inv, clamped to [-127, 127] (fmaxf returns the non-NaN operand,
// so NaN becomes -127, like f32::max), then rounded half to even.
__device__ __forceinline__ i8 sq_requantize(float y, float inv) {
    float v = fminf(fmaxf(y * inv, -127.0f), 127.0f);
    return (i8)__float2int_rn(v);
}

// sq_kernels::quantize::scale_for_absmax: (absmax / 127, 127 / absmax), or (0, 0) for a zero
// (or subnormal-overflowing) absmax.
__device__ __forceinline__ void sq_scale_for_absmax(float absmax, float* scale, float* inv) {
    float i = 127.0f / absmax;
    if (absmax > 0.0f && isfinite(i)) {
        *scale = absmax / 127.0f;
        *inv = i;
    } else {
        *scale = 0.0f;
        *inv = 0.0f;
    }
}

__device__ __forceinline__ float sq_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(SQ_FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float sq_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SQ_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int sq_warp_sum_i32(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SQ_FULL_MASK, v, o);
    return v;
}

// Max of a non-negative value over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. NaN inputs are ignored, like f32::max.
__device__ float sq_block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = sq_warp_max(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        v = sq_warp_max(v);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    const float r = partial[0];
    __syncthreads();  // partial[] may be reused by the next call
    return r;
}

// Sum over the block, same contract as sq_block_max.
__device__ float sq_block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = sq_warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        v = sq_warp_sum(v);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    const float r = partial[0];
    __syncthreads();
    return r;
}
