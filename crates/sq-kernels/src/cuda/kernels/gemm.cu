// INT8 GEMMs of our own, exact INT32 accumulation with __dp4a (sm_61+):
//
// - sq_gemm_small_m: acc[i][j] = sum_k x[i][k] * w[j][k] for the decode shapes (few rows),
//   where cuBLASLt's IMMA kernels are not offered (PyTorch's _int_mm refuses m <= 16 for the
//   same reason). Memory bound: one warp per output column streams the weight row once per
//   block of SM_ROWS activation rows, 16 bytes per lane per step. Needs 16-byte aligned rows
//   (ldx, ldw multiples of 16) and K zero-padded to kp, a multiple of 16.
// - sq_bmm_tiled: the batched C[b] = A[b] . op(B[b]) of attention with arbitrary strides, and
//   the fallback of the main GEMM when cuBLASLt declines a shape. 64 x 64 output tiles, K in
//   steps of 32 through shared memory, 4 x 4 accumulators per thread.

#define SM_ROWS 8
#define SM_WARPS 4

extern "C" __global__ void __launch_bounds__(SM_WARPS * 32)
sq_gemm_small_m(const i8* __restrict__ x, long long ldx, const i8* __restrict__ w,
                long long ldw, int m, int n, int kp, int* __restrict__ acc, long long ldacc) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * SM_WARPS + warp;
    const int i0 = blockIdx.y * SM_ROWS;
    if (j >= n) return;  // whole warps leave; no block-wide barrier below
    const int rows = min(SM_ROWS, m - i0);
    int sum[SM_ROWS];
#pragma unroll
    for (int r = 0; r < SM_ROWS; ++r) sum[r] = 0;
    const int4* wr = (const int4*)(w + (long long)j * ldw);
    const int chunks = kp >> 4;
    for (int c = lane; c < chunks; c += 32) {
        const int4 wv = wr[c];
#pragma unroll
        for (int r = 0; r < SM_ROWS; ++r) {
            if (r < rows) {
                const int4 xv = ((const int4*)(x + (long long)(i0 + r) * ldx))[c];
                int s = sum[r];
                s = __dp4a(xv.x, wv.x, s);
                s = __dp4a(xv.y, wv.y, s);
                s = __dp4a(xv.z, wv.z, s);
                s = __dp4a(xv.w, wv.w, s);
                sum[r] = s;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SM_ROWS; ++r) {
        const int s = sq_warp_sum_i32(sum[r]);
        if (lane == 0 && r < rows) acc[(long long)(i0 + r) * ldacc + j] = s;
    }
}

#define BT 64     // output tile edge
#define KT 32     // K per shared-memory step
#define KPAD 36   // row pitch in shared memory: 9 words, so 16 consecutive rows hit 16 banks

// C[b][i][j] = sum_k A[b][i][k] * op(B)[b][k][j], where op(B)[k][j] = B[b][j][k] when b_trans
// (B is [batch, n, k], e.g. Q.K^T) and B[b][k][j] otherwise (B is [batch, k, n], e.g. P.V).
// Strides are in elements. The output is INT32 (out_i32) or acc * scale in f32 (out_f32);
// exactly one of them is non-null. Grid: (ceil(n/64), ceil(m/64), min(batch, 65535)).
extern "C" __global__ void __launch_bounds__(256)
sq_bmm_tiled(const i8* __restrict__ a, long long a_bs, long long a_rs,
             const i8* __restrict__ b, long long b_bs, long long b_rs, int b_trans,
             int batch, int m, int n, int k,
             int* out_i32, float* out_f32, float scale, long long o_bs, long long o_rs) {
    __shared__ __align__(16) i8 As[BT][KPAD];
    __shared__ __align__(16) i8 Bs[BT][KPAD];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int i0 = blockIdx.y * BT, j0 = blockIdx.x * BT;
    for (long long bi = blockIdx.z; bi < batch; bi += gridDim.z) {
        const i8* ab = a + bi * a_bs;
        const i8* bb = b + bi * b_bs;
        int accum[4][4];
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) accum[ii][jj] = 0;
        for (int k0 = 0; k0 < k; k0 += KT) {
            for (int e = threadIdx.x; e < BT * KT; e += 256) {
                const int r = e / KT, c = e % KT;  // k fastest: coalesced rows of A
                const int gi = i0 + r, gk = k0 + c;
                As[r][c] = (gi < m && gk < k) ? ab[gi * a_rs + gk] : (i8)0;
            }
            for (int e = threadIdx.x; e < BT * KT; e += 256) {
                int r, c;  // r: output column within the tile, c: k within the step
                if (b_trans) {
                    r = e / KT;
                    c = e % KT;
                } else {
                    c = e / BT;
                    r = e % BT;
                }
                const int gj = j0 + r, gk = k0 + c;
                i8 v = 0;
                if (gj < n && gk < k) v = b_trans ? bb[gj * b_rs + gk] : bb[gk * b_rs + gj];
                Bs[r][c] = v;
            }
            __syncthreads();
#pragma unroll
            for (int kq = 0; kq < KT; kq += 4) {
                int av[4], bv[4];
#pragma unroll
                for (int ii = 0; ii < 4; ++ii) av[ii] = *(const int*)&As[ty + 16 * ii][kq];
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) bv[jj] = *(const int*)&Bs[tx + 16 * jj][kq];
#pragma unroll
                for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj)
                        accum[ii][jj] = __dp4a(av[ii], bv[jj], accum[ii][jj]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
            const int gi = i0 + ty + 16 * ii;
            if (gi >= m) continue;
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                const int gj = j0 + tx + 16 * jj;
                if (gj >= n) continue;
                const long long o = bi * o_bs + gi * o_rs + gj;
                if (out_i32) {
                    out_i32[o] = accum[ii][jj];
                } else {
                    out_f32[o] = (float)accum[ii][jj] * scale;
                }
            }
        }
    }
}
