// Fused causal attention (FlashAttention-2 style) on bf16 tensor cores (WMMA m16n16k16,
// f32 accumulation), for q, k, v, o, dO of layout [BH, T, D] (bf16, rows contiguous) and
// the per-row log-sum-exp `lse [BH, T]` (f32). No [T, T] matrix ever reaches device memory:
// the forward keeps a running max / sum per query row and rescales its output accumulator;
// the backward recomputes the probabilities from q, k and lse, one kernel per key block
// (dK, dV) and one per query block (dQ), so every output element has one writer: no atomics,
// bitwise reproducible. Compiled once per head dim: HEAD_DIM is a multiple of 16 up to 128.
//
// Blocks of 128 threads (4 warps) own 64 rows (16 per warp); tiles of the other side are 64
// rows, staged in shared memory. Row r = lane/2 of a warp's 16 rows is handled by two
// lanes, 32 columns each, for the softmax part.
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

#define D HEAD_DIM
#define BR 64            // rows per block (and per tile of the other side)
#define NW 4             // warps per block
#define LDK (D + 8)      // smem row stride of bf16 [64][D] tiles
#define LDS 68           // smem row stride of f32 [16][64] per-warp scores
#define LDP 72           // smem row stride of bf16 [16][64] per-warp probabilities
#define LDO (D + 4)      // smem row stride of f32 [16][D] per-warp output staging
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define NEG_INF (-__int_as_float(0x7f800000))

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragBr;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBc;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// Byte offsets of the shared-memory regions (each a multiple of 128).
#define TILE_BYTES (BR * LDK * 2)
#define SW_BYTES (NW * 16 * LDS * 4)
#define PW_BYTES (NW * 16 * LDP * 2)
#define OW_BYTES (NW * 16 * LDO * 4)

// rows [row0, row0 + 64) of a [T, D] matrix into a [64][LDK] smem tile; rows >= t zeroed.
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int row0, int t) {
    const int vecs = D / 8;
    for (int i = threadIdx.x; i < BR * vecs; i += blockDim.x) {
        const int r = i / vecs, c = (i % vecs) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < t) v = *(const uint4*)(g + (size_t)(row0 + r) * D + c);
        *(uint4*)(s + r * LDK + c) = v;
    }
}

// out[16 x 64] (f32, ldm LDS) = A rows [16][D] (row-major smem, ldm LDK) times the rows
// [64][D] of `b` used transposed (B = bᵀ).
__device__ __forceinline__ void mm_abt(float* out, const bf16* a, const bf16* b) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            FragA fa;
            FragBc fb;
            wmma::load_matrix_sync(fa, a + kk * 16, LDK);
            wmma::load_matrix_sync(fb, b + j * 16 * LDK + kk * 16, LDK);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(out + j * 16, acc, LDS, wmma::mem_row_major);
    }
}

// acc[n] (16 x D as D/16 fragments) += P [16][64] (bf16, ldm LDP) times rows [64][D] of b.
__device__ __forceinline__ void mm_pb_acc(FragC* acc, const bf16* p, const bf16* b) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        FragA fa;
        wmma::load_matrix_sync(fa, p + kk * 16, LDP);
#pragma unroll
        for (int n = 0; n < D / 16; n++) {
            FragBr fb;
            wmma::load_matrix_sync(fb, b + kk * 16 * LDK + n * 16, LDK);
            wmma::mma_sync(acc[n], fa, fb, acc[n]);
        }
    }
}

// ---- forward: o = softmax(scale · q kᵀ, causal) v, lse per query row. ----
// grid (ceil(T/64), BH), block 128, dynamic smem 3 TILE + SW + PW + OW bytes.
extern "C" __global__ void __launch_bounds__(128) flash_fwd(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    bf16* __restrict__ o, float* __restrict__ lse, int t, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* Qs = (bf16*)smem;
    bf16* Ks = (bf16*)(smem + TILE_BYTES);
    bf16* Vs = (bf16*)(smem + 2 * TILE_BYTES);
    float* Sw = (float*)(smem + 3 * TILE_BYTES);
    bf16* Pw = (bf16*)(smem + 3 * TILE_BYTES + SW_BYTES);
    float* Ow = (float*)(smem + 3 * TILE_BYTES + SW_BYTES + PW_BYTES);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t bh = blockIdx.y;
    const int q0 = blockIdx.x * BR;
    const bf16* qg = q + bh * (size_t)t * D;
    const bf16* kg = k + bh * (size_t)t * D;
    const bf16* vg = v + bh * (size_t)t * D;
    float* sw = Sw + w * 16 * LDS;
    bf16* pw = Pw + w * 16 * LDP;
    float* ow = Ow + w * 16 * LDO;
    const int r = lane >> 1, half = lane & 1;
    const int qpos = q0 + w * 16 + r;
    const float sl2 = scale * LOG2E;
    float m = NEG_INF, l = 0.f;
    float oacc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) oacc[i] = 0.f;
    load_tile(Qs, qg, q0, t);
    const int kend = min(t, q0 + BR);
    for (int k0 = 0; k0 < kend; k0 += BR) {
        __syncthreads();
        load_tile(Ks, kg, k0, t);
        load_tile(Vs, vg, k0, t);
        __syncthreads();
        mm_abt(sw, Qs + w * 16 * LDK, Ks);
        __syncwarp();
        float s[32];
        float mx = NEG_INF;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int kpos = k0 + half * 32 + c;
            const float x = (kpos <= qpos && kpos < t) ? sw[r * LDS + half * 32 + c] * sl2 : NEG_INF;
            s[c] = x;
            mx = fmaxf(mx, x);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_new = fmaxf(m, mx);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const float p = exp2f(s[c] - m_use);
            sum += p;
            pw[r * LDP + half * 32 + c] = __float2bfloat16(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        const float alpha = exp2f(m - m_use);
        l = l * alpha + sum;
        m = m_new;
        __syncwarp();
        FragC acc[D / 16];
#pragma unroll
        for (int n = 0; n < D / 16; n++) wmma::fill_fragment(acc[n], 0.f);
        mm_pb_acc(acc, pw, Vs);
#pragma unroll
        for (int n = 0; n < D / 16; n++)
            wmma::store_matrix_sync(ow + n * 16, acc[n], LDO, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < D / 2; i++) oacc[i] = oacc[i] * alpha + ow[r * LDO + half * (D / 2) + i];
        __syncwarp();
    }
    if (qpos < t) {
        const float inv = 1.f / l;
        bf16* orow = o + (bh * (size_t)t + qpos) * D + half * (D / 2);
#pragma unroll
        for (int i = 0; i < D / 2; i++) orow[i] = __float2bfloat16(oacc[i] * inv);
        if (half == 0) lse[bh * (size_t)t + qpos] = (m + log2f(l)) * LN2;
    }
}

// ---- delta[row] = Σ_d dO[row, d] · O[row, d] (one warp per row). ----
extern "C" __global__ void flash_delta(const bf16* __restrict__ o, const bf16* __restrict__ d_o,
                                       float* __restrict__ delta, size_t rows) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float s = 0.f;
    for (int d = lane; d < D; d += 32)
        s += __bfloat162float(o[row * D + d]) * __bfloat162float(d_o[row * D + d]);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) delta[row] = s;
}

// Stores 16 x D accumulator fragments times `mul` as bf16 rows [row0, row0 + 16) of `g`
// ([T, D]), rows >= t skipped, through the warp's f32 staging `ow`.
__device__ __forceinline__ void store_rows(bf16* g, FragC* acc, float* ow, int row0, int t,
                                           float mul) {
#pragma unroll
    for (int n = 0; n < D / 16; n++)
        wmma::store_matrix_sync(ow + n * 16, acc[n], LDO, wmma::mem_row_major);
    __syncwarp();
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * D; i += 32) {
        const int rr = i / D, c = i % D;
        if (row0 + rr < t) g[(size_t)(row0 + rr) * D + c] = __float2bfloat16(ow[rr * LDO + c] * mul);
    }
    __syncwarp();
}

// The backward kernels' shared memory: four [64][D] tiles (this block's own two first,
// then the two it streams), this warp's f32 scores and bf16 probabilities, and the
// log2-scaled lse and delta of 64 query rows.
struct BwdSmem {
    bf16* tile[4];
    float* sw;
    bf16* pw;
    float* l2;
    float* dl;
};
__device__ __forceinline__ BwdSmem bwd_smem(unsigned char* smem, int w) {
    BwdSmem b;
#pragma unroll
    for (int i = 0; i < 4; i++) b.tile[i] = (bf16*)(smem + i * TILE_BYTES);
    b.sw = (float*)(smem + 4 * TILE_BYTES) + w * 16 * LDS;
    b.pw = (bf16*)(smem + 4 * TILE_BYTES + SW_BYTES) + w * 16 * LDP;
    b.l2 = (float*)(smem + 4 * TILE_BYTES + SW_BYTES + PW_BYTES);
    b.dl = b.l2 + BR;
    return b;
}

// Tiles `s0`, `s1` from rows [row0, row0 + 64) of `g0`, `g1` (the [T, D] matrices of one
// row of BH), and with `lse` the query rows' lse·log2(e) and delta (0 past t).
__device__ __forceinline__ void load_tiles(bf16* s0, const bf16* g0, bf16* s1, const bf16* g1,
                                           int row0, int t) {
    load_tile(s0, g0, row0, t);
    load_tile(s1, g1, row0, t);
}
__device__ __forceinline__ void load_row_stats(const BwdSmem& b, const float* lse,
                                               const float* delta, int row0, int t) {
    for (int i = threadIdx.x; i < BR; i += blockDim.x) {
        const bool ok = row0 + i < t;
        b.l2[i] = ok ? lse[row0 + i] * LOG2E : 0.f;
        b.dl[i] = ok ? delta[row0 + i] : 0.f;
    }
}

// ---- backward, one block per 64 keys: dK, dV. ----
// grid (ceil(T/64), BH), block 128, smem 4 TILE + SW + PW + 2·64·4 bytes (the output
// staging, OW_BYTES <= 2 TILE_BYTES, reuses two tiles after the loop).
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkv(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta,
    bf16* __restrict__ dk, bf16* __restrict__ dv, int t, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const BwdSmem b = bwd_smem(smem, w);
    bf16 *Ks = b.tile[0], *Vs = b.tile[1], *Qs = b.tile[2], *dOs = b.tile[3];
    float* sw = b.sw;
    bf16* pw = b.pw;
    const size_t base = blockIdx.y * (size_t)t;
    const int k0 = blockIdx.x * BR;
    const int r = lane >> 1, half = lane & 1;
    const int kpos = k0 + w * 16 + r;
    const float sl2 = scale * LOG2E;
    load_tiles(Ks, k + base * D, Vs, v + base * D, k0, t);
    FragC dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; n++) {
        wmma::fill_fragment(dk_acc[n], 0.f);
        wmma::fill_fragment(dv_acc[n], 0.f);
    }
    for (int qt = k0; qt < t; qt += BR) {
        __syncthreads();
        load_tiles(Qs, q + base * D, dOs, d_o + base * D, qt, t);
        load_row_stats(b, lse + base, delta + base, qt, t);
        __syncthreads();
        // Sᵀ [16 keys x 64 queries] = K_w Qᵀ, then Pᵀ.
        mm_abt(sw, Ks + w * 16 * LDK, Qs);
        __syncwarp();
        float p[32];
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int col = half * 32 + c, qpos = qt + col;
            const bool ok = kpos <= qpos && qpos < t && kpos < t;
            p[c] = ok ? exp2f(sw[r * LDS + col] * sl2 - b.l2[col]) : 0.f;
            pw[r * LDP + col] = __float2bfloat16(p[c]);
        }
        __syncwarp();
        mm_pb_acc(dv_acc, pw, dOs);  // dV_w += Pᵀ dO
        __syncwarp();
        mm_abt(sw, Vs + w * 16 * LDK, dOs);  // dPᵀ = V_w dOᵀ
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int col = half * 32 + c;
            pw[r * LDP + col] = __float2bfloat16(p[c] * (sw[r * LDS + col] - b.dl[col]));
        }
        __syncwarp();
        mm_pb_acc(dk_acc, pw, Qs);  // dK_w += dSᵀ Q
        __syncwarp();
    }
    // The output staging reuses tiles 2-3 (Qs, dOs), free once every warp is done.
    __syncthreads();
    float* ow = (float*)Qs + w * 16 * LDO;
    store_rows(dk + base * D, dk_acc, ow, k0 + w * 16, t, scale);
    store_rows(dv + base * D, dv_acc, ow, k0 + w * 16, t, 1.f);
}

// ---- backward, one block per 64 queries: dQ. ----
// grid (ceil(T/64), BH), block 128, smem 4 TILE + SW + PW + 2·64·4 bytes (the output
// staging, OW_BYTES <= 2 TILE_BYTES, reuses two tiles after the loop).
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta,
    bf16* __restrict__ dq, int t, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const BwdSmem b = bwd_smem(smem, w);
    bf16 *Qs = b.tile[0], *dOs = b.tile[1], *Ks = b.tile[2], *Vs = b.tile[3];
    float* sw = b.sw;
    bf16* pw = b.pw;
    const size_t base = blockIdx.y * (size_t)t;
    const int q0 = blockIdx.x * BR;
    const int r = lane >> 1, half = lane & 1;
    const int qpos = q0 + w * 16 + r;
    const float sl2 = scale * LOG2E;
    load_tiles(Qs, q + base * D, dOs, d_o + base * D, q0, t);
    load_row_stats(b, lse + base, delta + base, q0, t);
    FragC dq_acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma::fill_fragment(dq_acc[n], 0.f);
    const int kend = min(t, q0 + BR);
    for (int k0 = 0; k0 < kend; k0 += BR) {
        __syncthreads();
        load_tiles(Ks, k + base * D, Vs, v + base * D, k0, t);
        __syncthreads();
        mm_abt(sw, Qs + w * 16 * LDK, Ks);  // S = Q_w Kᵀ
        __syncwarp();
        const float lrow = b.l2[w * 16 + r], drow = b.dl[w * 16 + r];
        float p[32];
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int col = half * 32 + c, kpos = k0 + col;
            const bool ok = kpos <= qpos && kpos < t && qpos < t;
            p[c] = ok ? exp2f(sw[r * LDS + col] * sl2 - lrow) : 0.f;
        }
        __syncwarp();
        mm_abt(sw, dOs + w * 16 * LDK, Vs);  // dP = dO_w Vᵀ
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int col = half * 32 + c;
            pw[r * LDP + col] = __float2bfloat16(p[c] * (sw[r * LDS + col] - drow));
        }
        __syncwarp();
        mm_pb_acc(dq_acc, pw, Ks);  // dQ_w += dS K
        __syncwarp();
    }
    // The output staging reuses tiles 2-3 (Ks, Vs), free once every warp is done.
    __syncthreads();
    float* ow = (float*)Ks + w * 16 * LDO;
    store_rows(dq + base * D, dq_acc, ow, q0 + w * 16, t, scale);
}
