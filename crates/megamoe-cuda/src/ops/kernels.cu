// Transformer-step kernels (RMSNorm, RoPE, cross-entropy, embedding, causal softmax, AdamW).
// Compiled by NVRTC once per element type: ELEM is `float` (f32 parity mode) or
// `__nv_bfloat16` (bf16 storage). All math and every reduction are f32 (f64 where noted),
// in a fixed order: no float atomics, bitwise reproducible run to run.
// Every kernel that reduces a row runs with exactly BLOCK threads.
#include <cuda_bf16.h>

typedef ELEM T;
#define BLOCK 256

__device__ __forceinline__ float ldf(const float* p) { return *p; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void stf(float* p, float v) { *p = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

#define NEG_INF (-__int_as_float(0x7f800000))
#define QNAN __int_as_float(0x7fc00000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide sum / max over BLOCK threads (fixed tree: deterministic). All threads get it.
__device__ float block_sum(float v) {
    __shared__ float s[BLOCK / 32];
    __syncthreads();
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = 0.f;
#pragma unroll
    for (int i = 0; i < BLOCK / 32; i++) r += s[i];
    return r;
}
__device__ float block_max(float v) {
    __shared__ float s[BLOCK / 32];
    __syncthreads();
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = NEG_INF;
#pragma unroll
    for (int i = 0; i < BLOCK / 32; i++) r = fmaxf(r, s[i]);
    return r;
}

// ---- RMSNorm: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps). One block per row. ----
extern "C" __global__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                        T* __restrict__ y, float* __restrict__ rstd, int h,
                                        float eps) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * h;
    float ss = 0.f;
    for (int j = threadIdx.x; j < h; j += BLOCK) {
        float v = ldf(xr + j);
        ss += v * v;
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < h; j += BLOCK) stf(y + row * h + j, ldf(xr + j) * r * ldf(w + j));
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd.
extern "C" __global__ void rms_norm_bwd_input(const T* __restrict__ dy, const T* __restrict__ x,
                                              const T* __restrict__ w,
                                              const float* __restrict__ rstd,
                                              T* __restrict__ dx, int h) {
    const size_t row = blockIdx.x;
    const float r = rstd[row];
    const T* xr = x + row * h;
    const T* dr = dy + row * h;
    float dot = 0.f;
    for (int j = threadIdx.x; j < h; j += BLOCK) dot += ldf(dr + j) * ldf(w + j) * (ldf(xr + j) * r);
    dot = block_sum(dot) / (float)h;
    for (int j = threadIdx.x; j < h; j += BLOCK) {
        float g = ldf(dr + j) * ldf(w + j);
        stf(dx + row * h + j, r * (g - ldf(xr + j) * r * dot));
    }
}

// Weight gradient, pass 1: partial[chunk, j] = sum over the chunk's rows of dy*x*rstd.
// grid ceil(h / BLOCK) * chunks (column tile fastest); rows [chunk*per, (chunk+1)*per).
extern "C" __global__ void rms_norm_bwd_weight_partial(const T* __restrict__ dy,
                                                       const T* __restrict__ x,
                                                       const float* __restrict__ rstd,
                                                       float* __restrict__ partial, int rows,
                                                       int h, int per) {
    const int tiles = (h + BLOCK - 1) / BLOCK;
    const int chunk = blockIdx.x / tiles;
    const int j = (blockIdx.x % tiles) * BLOCK + threadIdx.x;
    if (j >= h) return;
    const int r0 = chunk * per;
    const int r1 = min(rows, r0 + per);
    float acc = 0.f;
    for (int r = r0; r < r1; r++) acc += ldf(dy + (size_t)r * h + j) * ldf(x + (size_t)r * h + j) * rstd[r];
    partial[(size_t)chunk * h + j] = acc;
}

// Column sums of partial [chunks, n] in chunk order: out[j] = beta * out[j] + sum.
extern "C" __global__ void sum_partials(const float* __restrict__ partial, float* __restrict__ out,
                                        int chunks, int n, float beta) {
    const int j = blockIdx.x * BLOCK + threadIdx.x;
    if (j >= n) return;
    float acc = 0.f;
    for (int c = 0; c < chunks; c++) acc += partial[(size_t)c * n + j];
    out[j] = beta == 0.f ? acc : beta * out[j] + acc;
}

// ---- Vectorised row kernels: 8 consecutive elements per access (16-byte loads of bf16,
// two of f32). Callers guarantee h % 8 == 0 and 16-byte aligned bases. ----
#define VEC 8
__device__ __forceinline__ void ld8(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void ld8(const __nv_bfloat16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* q = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 f = __bfloat1622float2(q[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void st8(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8(__nv_bfloat16* p, const float* v) {
    uint4 u;
    __nv_bfloat162* q = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) q[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}

// RMSNorm forward, vectorised (h % 8 == 0): the formula of rms_norm_fwd.
extern "C" __global__ void rms_norm_fwd_vec(const T* __restrict__ x, const T* __restrict__ w,
                                            T* __restrict__ y, float* __restrict__ rstd, int h,
                                            float eps) {
    const size_t base = (size_t)blockIdx.x * h;
    float ss = 0.f;
    for (int j = threadIdx.x * VEC; j < h; j += BLOCK * VEC) {
        float v[VEC];
        ld8(x + base + j, v);
#pragma unroll
        for (int i = 0; i < VEC; i++) ss += v[i] * v[i];
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int j = threadIdx.x * VEC; j < h; j += BLOCK * VEC) {
        float v[VEC], wv[VEC];
        ld8(x + base + j, v);
        ld8(w + j, wv);
#pragma unroll
        for (int i = 0; i < VEC; i++) v[i] = v[i] * r * wv[i];
        st8(y + base + j, v);
    }
}

// Residual-stream sum y = a + (b + c) (an MoE block's output: the residual plus the shared
// and routed experts' outputs), f32 math, rounded once to T; 8 elements per thread step
// (the caller guarantees n % 8 == 0 and 16-byte aligned buffers; n8 = n / 8).
extern "C" __global__ void add_sum_vec(const T* __restrict__ a, const T* __restrict__ b,
                                       const T* __restrict__ c, T* __restrict__ y, size_t n8) {
    for (size_t k = blockIdx.x * (size_t)BLOCK + threadIdx.x; k < n8;
         k += (size_t)gridDim.x * BLOCK) {
        const size_t i = k * VEC;
        float av[VEC], bv[VEC], cv[VEC];
        ld8(a + i, av);
        ld8(b + i, bv);
        ld8(c + i, cv);
#pragma unroll
        for (int q = 0; q < VEC; q++) av[q] = __fadd_rn(av[q], __fadd_rn(bv[q], cv[q]));
        st8(y + i, av);
    }
}

// RMSNorm backward fused with the residual gradient, rows [blockIdx.x * per, +per):
//   out = res + rstd * (g - xhat * mean(g * xhat)) (f32), g = dy * w, xhat = x * rstd;
//   act (when not null) the same values stored as T;
//   partial[blockIdx.x, j] = sum over the block's rows, in row order, of dy * x * rstd.
// h % 8 == 0, 16-byte aligned rows, h floats of dynamic shared memory (the weight-gradient
// accumulators: each thread owns its columns, so they need no synchronisation).
template <typename D>
__device__ __forceinline__ void rms_norm_bwd_add_rows(
    const D* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
    const float* __restrict__ rstd, const float* __restrict__ res, float* __restrict__ out,
    T* __restrict__ act, float* __restrict__ partial, int rows, int h, int per) {
    extern __shared__ float dw_acc[];
    const int r0 = blockIdx.x * per;
    const int r1 = min(rows, r0 + per);
    for (int j = threadIdx.x * VEC; j < h; j += BLOCK * VEC) {
#pragma unroll
        for (int i = 0; i < VEC; i++) dw_acc[j + i] = 0.f;
    }
    for (int r = r0; r < r1; r++) {
        const size_t base = (size_t)r * h;
        const float rs = rstd[r];
        float dot = 0.f;
        for (int j = threadIdx.x * VEC; j < h; j += BLOCK * VEC) {
            float d[VEC], xv[VEC], wv[VEC];
            ld8(dy + base + j, d);
            ld8(x + base + j, xv);
            ld8(w + j, wv);
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                dot += d[i] * wv[i] * (xv[i] * rs);
                dw_acc[j + i] += d[i] * xv[i] * rs;
            }
        }
        dot = block_sum(dot) / (float)h;
        for (int j = threadIdx.x * VEC; j < h; j += BLOCK * VEC) {
            float d[VEC], xv[VEC], wv[VEC], o[VEC];
            ld8(dy + base + j, d);
            ld8(x + base + j, xv);
            ld8(w + j, wv);
            ld8(res + base + j, o);
#pragma unroll
            for (int i = 0; i < VEC; i++) o[i] += rs * (d[i] * wv[i] - xv[i] * rs * dot);
            st8(out + base + j, o);
            if (act != nullptr) st8(act + base + j, o);
        }
    }
    for (int j = threadIdx.x * VEC; j < h; j += BLOCK * VEC) {
#pragma unroll
        for (int i = 0; i < VEC; i++) partial[(size_t)blockIdx.x * h + j + i] = dw_acc[j + i];
    }
}
extern "C" __global__ void rms_norm_bwd_add(const T* __restrict__ dy, const T* __restrict__ x,
                                            const T* __restrict__ w,
                                            const float* __restrict__ rstd,
                                            const float* __restrict__ res,
                                            float* __restrict__ out, T* __restrict__ act,
                                            float* __restrict__ partial, int rows, int h,
                                            int per) {
    rms_norm_bwd_add_rows<T>(dy, x, w, rstd, res, out, act, partial, rows, h, per);
}
// The same with an f32 dy (an upstream sum kept in f32).
extern "C" __global__ void rms_norm_bwd_add_f32dy(const float* __restrict__ dy,
                                                  const T* __restrict__ x,
                                                  const T* __restrict__ w,
                                                  const float* __restrict__ rstd,
                                                  const float* __restrict__ res,
                                                  float* __restrict__ out, T* __restrict__ act,
                                                  float* __restrict__ partial, int rows, int h,
                                                  int per) {
    rms_norm_bwd_add_rows<float>(dy, x, w, rstd, res, out, act, partial, rows, h, per);
}

// ---- RoPE, rotate-half. Table [t, d/2] of cos and sin, computed in f64. ----
extern "C" __global__ void rope_table(float* __restrict__ cosv, float* __restrict__ sinv, int t,
                                      int d, double theta) {
    const int half = d / 2;
    const int i = blockIdx.x * BLOCK + threadIdx.x;
    if (i >= t * half) return;
    const int p = i / half, q = i % half;
    const double freq = pow(theta, -2.0 * (double)q / (double)d);
    const double a = (double)p * freq;
    cosv[i] = (float)cos(a);
    sinv[i] = (float)sin(a);
}

// x [B, T, NH, D] -> y (may alias x); sign +1 forward, -1 backward. One thread per pair.
// Only the first `rot` heads of each position are rotated (rot = nh: all); the others are
// neither read nor written (a fused q|k|v row: q and k rotated, v left in place).
extern "C" __global__ void rope_apply(const T* x, T* y, const float* __restrict__ cosv,
                                      const float* __restrict__ sinv, size_t pairs, int t, int nh,
                                      int d, float sign, int rot) {
    const int half = d / 2;
    for (size_t i = blockIdx.x * (size_t)BLOCK + threadIdx.x; i < pairs; i += (size_t)gridDim.x * BLOCK) {
        const size_t rrow = i / half;
        const size_t pos = rrow / rot;
        const size_t row = pos * nh + rrow % rot;
        const int q = (int)(i % half);
        const int p = (int)(pos % t);
        const float c = cosv[p * half + q];
        const float s = sign * sinv[p * half + q];
        const float x1 = ldf(x + row * d + q), x2 = ldf(x + row * d + q + half);
        stf(y + row * d + q, x1 * c - x2 * s);
        stf(y + row * d + q + half, x2 * c + x1 * s);
    }
}

// Vectorised rope_apply (d / 2 % 8 == 0, 16-byte aligned x and y): one thread per 8 pairs
// of a rotated row, the formula of rope_apply. y may alias x (each thread reads before it writes
// the same elements).
extern "C" __global__ void rope_apply_vec(const T* x, T* y, const float* __restrict__ cosv,
                                          const float* __restrict__ sinv, unsigned items, int t,
                                          int nh, int d, float sign, int rot) {
    const unsigned half = (unsigned)d / 2;
    const unsigned per_row = half / VEC;
    for (unsigned i = blockIdx.x * BLOCK + threadIdx.x; i < items; i += gridDim.x * BLOCK) {
        const unsigned rrow = i / per_row;
        const unsigned q = (i - rrow * per_row) * VEC;
        const unsigned pos = rrow / (unsigned)rot;
        const unsigned row = pos * (unsigned)nh + rrow % (unsigned)rot;
        const unsigned p = pos % (unsigned)t;
        const size_t at = (size_t)row * d + q;
        float c[VEC], s[VEC], x1[VEC], x2[VEC], y1[VEC], y2[VEC];
        ld8(cosv + p * half + q, c);
        ld8(sinv + p * half + q, s);
        ld8(x + at, x1);
        ld8(x + at + half, x2);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            const float sk = sign * s[k];
            y1[k] = x1[k] * c[k] - x2[k] * sk;
            y2[k] = x2[k] * c[k] + x1[k] * sk;
        }
        st8(y + at, y1);
        st8(y + at + half, y2);
    }
}

// ---- Softmax cross-entropy over the vocabulary (logits [N, V], targets [N] i32). ----
// Counts the rows whose target is not `ignore` (one block).
extern "C" __global__ void ce_count_valid(const int* __restrict__ targets, int n, int ignore,
                                          int* __restrict__ n_valid) {
    float c = 0.f;
    for (int r = threadIdx.x; r < n; r += BLOCK) c += (targets[r] != ignore) ? 1.f : 0.f;
    c = block_sum(c); // exact: integers < 2^24
    if (threadIdx.x == 0) *n_valid = (int)c;
}

// One block per row: loss[r] = lse(x) - x[t] (0 if ignored, NaN if t is out of range, and
// then, when `err` is given, the error record err[4] = {11, t, row, v} is written if empty:
// megamoe-tensor's device index check); d_logits = (softmax(x) - onehot(t)) / n_valid (0 for
// ignored rows). `dx` may alias `x`.
extern "C" __global__ void ce_fwd_bwd(const T* x, T* dx, const int* __restrict__ targets,
                                      const int* __restrict__ n_valid, float* __restrict__ loss,
                                      int v, int ignore, int* err) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * v;
    T* dr = dx + row * v;
    const int t = targets[row];
    if (t == ignore) {
        for (int j = threadIdx.x; j < v; j += BLOCK) stf(dr + j, 0.f);
        if (threadIdx.x == 0) loss[row] = 0.f;
        return;
    }
    if (t < 0 || t >= v) {
        for (int j = threadIdx.x; j < v; j += BLOCK) stf(dr + j, QNAN);
        if (threadIdx.x == 0) {
            loss[row] = QNAN;
            if (err && atomicCAS(err, 0, 11) == 0) {
                err[1] = t;
                err[2] = (int)row;
                err[3] = v;
            }
        }
        return;
    }
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < v; j += BLOCK) mx = fmaxf(mx, ldf(xr + j));
    mx = block_max(mx);
    float s = 0.f;
    for (int j = threadIdx.x; j < v; j += BLOCK) s += expf(ldf(xr + j) - mx);
    s = block_sum(s);
    const float lse = mx + logf(s);
    const float xt = ldf(xr + t);
    __syncthreads(); // every thread has read x[t] before dx (maybe aliasing x) is written
    const float scale = 1.0f / (float)max(*n_valid, 1);
    for (int j = threadIdx.x; j < v; j += BLOCK) {
        float p = expf(ldf(xr + j) - lse);
        stf(dr + j, (p - (j == t ? 1.f : 0.f)) * scale);
    }
    if (threadIdx.x == 0) loss[row] = lse - xt;
}

// 16 bytes of T as f32 and back (4 floats or 8 bf16).
template <typename E> struct Pack16;
template <> struct Pack16<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
        f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
        f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
    }
    static __device__ __forceinline__ uint4 pack(const float* f) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                          __float_as_uint(f[3]));
    }
};
template <> struct Pack16<__nv_bfloat16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void unpack(const uint4& u, float* f) {
        const __nv_bfloat162* q = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 g = __bfloat1622float2(q[i]);
            f[2 * i] = g.x;
            f[2 * i + 1] = g.y;
        }
    }
    static __device__ __forceinline__ uint4 pack(const float* f) {
        uint4 u;
        __nv_bfloat162* q = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
        for (int i = 0; i < 4; i++) q[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        return u;
    }
};

// ce_fwd_bwd with the row held in registers: one read of the logits from memory and one
// write of the gradient (the scalar kernel reads the row three times). Each thread keeps
// up to CE_K 16-byte vectors (vector c = threadIdx.x + k * BLOCK); needs v a multiple of
// the vector width, v <= CE_K * BLOCK * width, 16-byte aligned rows. Same formulas.
#define CE_K 16
extern "C" __global__ void ce_fwd_bwd_vec(const T* x, T* dx, const int* __restrict__ targets,
                                          const int* __restrict__ n_valid,
                                          float* __restrict__ loss, int v, int ignore, int* err) {
    typedef Pack16<T> P;
    const size_t row = blockIdx.x;
    const int t = targets[row];
    if (t == ignore || t < 0 || t >= v) {
        const float fill = t == ignore ? 0.f : QNAN;
        for (int j = threadIdx.x; j < v; j += BLOCK) stf(dx + row * v + j, fill);
        if (threadIdx.x == 0) {
            loss[row] = fill;
            if (t != ignore && err && atomicCAS(err, 0, 11) == 0) {
                err[1] = t;
                err[2] = (int)row;
                err[3] = v;
            }
        }
        return;
    }
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * v);
    uint4* dr = reinterpret_cast<uint4*>(dx + row * v);
    const int nvec = v / P::N;
    uint4 raw[CE_K];
    float mx = NEG_INF;
#pragma unroll
    for (int k = 0; k < CE_K; k++) {
        const int c = threadIdx.x + k * BLOCK;
        if (c < nvec) {
            raw[k] = xr[c];
            float f[P::N];
            P::unpack(raw[k], f);
#pragma unroll
            for (int i = 0; i < P::N; i++) mx = fmaxf(mx, f[i]);
        }
    }
    mx = block_max(mx);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < CE_K; k++) {
        const int c = threadIdx.x + k * BLOCK;
        if (c < nvec) {
            float f[P::N];
            P::unpack(raw[k], f);
#pragma unroll
            for (int i = 0; i < P::N; i++) s += expf(f[i] - mx);
        }
    }
    s = block_sum(s);
    const float lse = mx + logf(s);
    const float xt = ldf(x + row * v + t);
    __syncthreads(); // every thread has read x[t] before dx (maybe aliasing x) is written
    const float scale = 1.0f / (float)max(*n_valid, 1);
#pragma unroll
    for (int k = 0; k < CE_K; k++) {
        const int c = threadIdx.x + k * BLOCK;
        if (c < nvec) {
            float f[P::N];
            P::unpack(raw[k], f);
#pragma unroll
            for (int i = 0; i < P::N; i++) {
                const float p = expf(f[i] - lse);
                f[i] = (p - (c * P::N + i == t ? 1.f : 0.f)) * scale;
            }
            dr[c] = P::pack(f);
        }
    }
    if (threadIdx.x == 0) loss[row] = lse - xt;
}

// out[0] = (sum_r loss[r]) / n_valid in f64, fixed order (one block).
extern "C" __global__ void ce_mean(const float* __restrict__ loss, const int* __restrict__ n_valid,
                                   int n, float* __restrict__ out) {
    __shared__ double s[BLOCK];
    double acc = 0.0;
    for (int r = threadIdx.x; r < n; r += BLOCK) acc += (double)loss[r];
    s[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double tot = 0.0;
        for (int i = 0; i < BLOCK; i++) tot += s[i];
        const int nv = *n_valid;
        out[0] = nv == 0 ? 0.f : (float)(tot / (double)nv);
    }
}

// ---- Embedding: gather rows; deterministic scatter-add backward. ----
// out[r] = table[ids[r]] (rows of h); an id outside [0, rows) gives a NaN row.
extern "C" __global__ void embed_gather(const T* __restrict__ table, const int* __restrict__ ids,
                                        T* __restrict__ out, int n, int h, int rows) {
    const int r = blockIdx.x;
    const int id = ids[r];
    const bool ok = id >= 0 && id < rows;
    for (int j = threadIdx.x; j < h; j += BLOCK)
        stf(out + (size_t)r * h + j, ok ? ldf(table + (size_t)id * h + j) : QNAN);
}

// rank[r] = #{r' < r : ids[r'] == ids[r]} (tiles of ids in shared memory); count[id] += 1
// (integer atomics: the counts are exact whatever the order).
extern "C" __global__ void embed_rank(const int* __restrict__ ids, int* __restrict__ rank,
                                      int* __restrict__ count, int n, int rows) {
    __shared__ int tile[BLOCK];
    const int r = blockIdx.x * BLOCK + threadIdx.x;
    const int id = r < n ? ids[r] : -1;
    int k = 0;
    const int last = min(n, (int)(blockIdx.x + 1) * BLOCK);
    for (int base = 0; base < last; base += BLOCK) {
        __syncthreads();
        tile[threadIdx.x] = base + threadIdx.x < n ? ids[base + threadIdx.x] : -2;
        __syncthreads();
        const int lim = min(BLOCK, r - base);
        for (int i = 0; i < lim; i++) k += tile[i] == id;
    }
    if (r < n) {
        rank[r] = k;
        if (id >= 0 && id < rows) atomicAdd(count + id, 1);
    }
}

// Exclusive prefix sum of count [rows] into offset [rows] (one block, fixed order).
extern "C" __global__ void exclusive_scan(const int* __restrict__ count, int* __restrict__ offset,
                                          int rows) {
    __shared__ int s[BLOCK];
    __shared__ int carry;
    if (threadIdx.x == 0) carry = 0;
    for (int base = 0; base < rows; base += BLOCK) {
        __syncthreads();
        const int i = base + threadIdx.x;
        const int c = i < rows ? count[i] : 0;
        s[threadIdx.x] = c;
        __syncthreads();
        for (int o = 1; o < BLOCK; o <<= 1) {
            int v = threadIdx.x >= o ? s[threadIdx.x - o] : 0;
            __syncthreads();
            s[threadIdx.x] += v;
            __syncthreads();
        }
        if (i < rows) offset[i] = carry + s[threadIdx.x] - c;
        __syncthreads();
        if (threadIdx.x == BLOCK - 1) carry += s[BLOCK - 1];
    }
}

// order[offset[ids[r]] + rank[r]] = r: the sources of each table row, in increasing r.
extern "C" __global__ void embed_place(const int* __restrict__ ids, const int* __restrict__ rank,
                                       const int* __restrict__ offset, int* __restrict__ order,
                                       int n, int rows) {
    const int r = blockIdx.x * BLOCK + threadIdx.x;
    if (r >= n) return;
    const int id = ids[r];
    if (id >= 0 && id < rows) order[offset[id] + rank[r]] = r;
}

// d_table[v] (+)= sum over its sources in increasing r of d_out[r] (f32 gradient). One block
// per table row; rows with no source are left as they are (or zeroed when !accumulate).
extern "C" __global__ void embed_scatter_add(const T* __restrict__ d_out,
                                             const int* __restrict__ order,
                                             const int* __restrict__ offset,
                                             const int* __restrict__ count,
                                             float* __restrict__ d_table, int h, int accumulate) {
    const size_t v = blockIdx.x;
    const int c = count[v];
    if (c == 0) {
        if (!accumulate)
            for (int j = threadIdx.x; j < h; j += BLOCK) d_table[v * h + j] = 0.f;
        return;
    }
    const int o = offset[v];
    for (int j = threadIdx.x; j < h; j += BLOCK) {
        float acc = accumulate ? d_table[v * h + j] : 0.f;
        for (int i = 0; i < c; i++) acc += ldf(d_out + (size_t)order[o + i] * h + j);
        d_table[v * h + j] = acc;
    }
}

// ---- Causal attention softmax over scores [rows, t] (row r is query position r % t). ----
// y[r, s] = softmax(scale * x[r, 0..=q])[s] for s <= q, 0 beyond. Scores f32, probs T.
extern "C" __global__ void causal_softmax_fwd(const float* __restrict__ x, T* __restrict__ y,
                                              int t, float scale) {
    const size_t row = blockIdx.x;
    const int valid = (int)(row % t) + 1;
    const float* xr = x + row * t;
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < valid; j += BLOCK) mx = fmaxf(mx, xr[j] * scale);
    mx = block_max(mx);
    float s = 0.f;
    for (int j = threadIdx.x; j < valid; j += BLOCK) s += expf(xr[j] * scale - mx);
    s = block_sum(s);
    const float inv = 1.0f / s;
    for (int j = threadIdx.x; j < t; j += BLOCK)
        stf(y + row * t + j, j < valid ? expf(xr[j] * scale - mx) * inv : 0.f);
}

// dx = scale * y * (dy - <y, dy>) per row (masked entries: y = 0 -> 0). dy f32, y/dx T.
extern "C" __global__ void causal_softmax_bwd(const T* __restrict__ y, const float* __restrict__ dy,
                                              T* __restrict__ dx, int t, float scale) {
    const size_t row = blockIdx.x;
    const int valid = (int)(row % t) + 1;
    const T* yr = y + row * t;
    const float* dr = dy + row * t;
    float dot = 0.f;
    for (int j = threadIdx.x; j < valid; j += BLOCK) dot += ldf(yr + j) * dr[j];
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < t; j += BLOCK)
        stf(dx + row * t + j, j < valid ? scale * ldf(yr + j) * (dr[j] - dot) : 0.f);
}

// ---- AdamW, PyTorch order; the f32 operations of megamoe-tensor's CPU kernel, unfused. ----
struct AdamWConsts {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc2, eps, decay, step;
    int has_decay;
};
// One element of the update on values: the weight `pi` and moments `mi`, `vi` (updated in
// place) from its gradient `gi`; returns the updated weight (shared by every AdamW kernel).
__device__ __forceinline__ float adamw_v(float pi, float& mi, float& vi, const float gi,
                                         const AdamWConsts& c) {
    mi = __fadd_rn(__fmul_rn(mi, c.beta1), 0.f);
    mi = __fadd_rn(mi, __fmul_rn(c.one_minus_beta1, gi));
    const float g2 = __fmul_rn(gi, gi);
    vi = __fadd_rn(__fmul_rn(vi, c.beta2), 0.f);
    vi = __fadd_rn(vi, __fmul_rn(c.one_minus_beta2, g2));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(__fadd_rn(__fmul_rn(vi, c.inv_bc2), 0.f)), 1.f), c.eps);
    const float step = __fdiv_rn(mi, denom);
    if (c.has_decay) pi = __fadd_rn(__fmul_rn(pi, c.decay), 0.f);
    return __fadd_rn(pi, __fmul_rn(c.step, step));
}
// One element of the update from its gradient `gi`. Returns the updated weight. The moments
// M are f32 or bf16 (`optim.moment_dtype`): bf16 ones are widened to f32, the update uses
// the new f32 moments, and they are stored rounded to nearest even (`__float2bfloat16`).
template <typename M>
__device__ __forceinline__ float adamw_g(size_t i, float* __restrict__ p, M* __restrict__ m,
                                         M* __restrict__ v, const float gi,
                                         T* __restrict__ p_copy, const AdamWConsts& c) {
    float mi = ldf(m + i), vi = ldf(v + i);
    const float pi = adamw_v(p[i], mi, vi, gi, c);
    p[i] = pi;
    stf(m + i, mi);
    stf(v + i, vi);
    if (p_copy) stf(p_copy + i, pi);
    return pi;
}
template <typename M>
__device__ __forceinline__ void adamw_at(size_t i, float* __restrict__ p, M* __restrict__ m,
                                         M* __restrict__ v, const T* __restrict__ g,
                                         T* __restrict__ p_copy, const AdamWConsts& c) {
    adamw_g(i, p, m, v, ldf(g + i), p_copy, c);
}
// p f32 (master weights); m, v f32, or bf16 where `m16`; g in T; p_copy (nullable) gets p in T.
extern "C" __global__ void adamw(float* __restrict__ p, void* __restrict__ m,
                                 void* __restrict__ v, const T* __restrict__ g,
                                 T* __restrict__ p_copy, size_t n, AdamWConsts c, int m16) {
    for (size_t i = blockIdx.x * (size_t)BLOCK + threadIdx.x; i < n; i += (size_t)gridDim.x * BLOCK) {
        if (m16) adamw_at(i, p, (__nv_bfloat16*)m, (__nv_bfloat16*)v, g, p_copy, c);
        else adamw_at(i, p, (float*)m, (float*)v, g, p_copy, c);
    }
}
// ---- graphs: AdamW whose constants and go-ahead live in device memory (a captured step
// graph replays it with the constants the host wrote before the replay). `apply[0] == 0`
// (a non-finite step) leaves p, m and v untouched. Moments as in `adamw`. ----
extern "C" __global__ void adamw_dev(float* __restrict__ p, void* __restrict__ m,
                                     void* __restrict__ v, const T* __restrict__ g, size_t n,
                                     const AdamWConsts* __restrict__ cp,
                                     const float* __restrict__ apply, int m16) {
    if (apply[0] == 0.f) return;
    const AdamWConsts c = *cp;
    for (size_t i = blockIdx.x * (size_t)BLOCK + threadIdx.x; i < n; i += (size_t)gridDim.x * BLOCK) {
        if (m16) adamw_at(i, p, (__nv_bfloat16*)m, (__nv_bfloat16*)v, g, (T*)nullptr, c);
        else adamw_at(i, p, (float*)m, (float*)v, g, (T*)nullptr, c);
    }
}

// ---- AdamW over many parameters in one launch (the flat-buffer optimizer). A segment
// table of 9 u64 words per parameter: p, g, m, v addresses (f32; m, v bf16 where flag bit 1
// is set), n, flags (bit 0: weight decay, bit 1: bf16 moments), first
// AdamW chunk, first norm block, bf16 weight copy address (0: none); segments in order,
// first chunks / blocks increasing. After the table: one u32 per AdamW chunk, its segment. ----
#define SEG_WORDS 9
// Elements of one AdamW chunk (one block): two float4 per thread.
#define ADAMW_VEC 2
#define ADAMW_CHUNK (BLOCK * 4 * ADAMW_VEC)
// The segment whose first block (table word `w`) is the last one <= blockIdx.x.
__device__ __forceinline__ int segment_of(const unsigned long long* t, int nseg, int w) {
    int lo = 0, hi = nseg - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (t[mid * SEG_WORDS + w] <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    return lo;
}
// Blocks of `sum_all_partial` over n elements (megamoe-cuda tensor/launch.rs `grid`).
__device__ __forceinline__ unsigned long long norm_blocks(unsigned long long n) {
    const unsigned long long b = (n + BLOCK - 1) / BLOCK;
    return b < 1 ? 1 : (b > 132 * 16 ? 132 * 16 : b);
}
// The tensor module's block_sum_d (same tree, so the sums match it bit for bit).
__device__ double block_sum_d(double v) {
    __shared__ double s[BLOCK];
    __syncthreads();
    s[threadIdx.x] = v;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    return s[0];
}
// Pass 1 of the global gradient norm: block b of segment s is block b of `sum_all_partial`
// over s's gradient (same slice, order and f64 tree): partial[blockIdx.x] = its sum of g^2.
extern "C" __global__ void seg_sumsq_partial(const unsigned long long* __restrict__ t, int nseg,
                                             double* __restrict__ partial) {
    const int s = segment_of(t, nseg, 7);
    const float* g = (const float*)t[s * SEG_WORDS + 1];
    const size_t n = t[s * SEG_WORDS + 4];
    const size_t nb = norm_blocks(n);
    const size_t b = blockIdx.x - t[s * SEG_WORDS + 7];
    double acc = 0.0;
    const size_t st = nb * BLOCK;
    size_t i = b * (size_t)BLOCK + threadIdx.x;
    // Eight loads in flight before the adds (in the same order: the same sum, at bandwidth).
    for (; i + 7 * st < n; i += 8 * st) {
        float x[8];
#pragma unroll
        for (int u = 0; u < 8; u++) x[u] = __ldcs(g + i + u * st);
#pragma unroll
        for (int u = 0; u < 8; u++) acc = __dadd_rn(acc, __dmul_rn((double)x[u], (double)x[u]));
    }
    for (; i < n; i += st) {
        const double v = g[i];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    acc = block_sum_d(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
// Pass 2 (one block of BLOCK threads): out[0] = sqrt of the sum over segments of each
// segment's f32-rounded sum of squares, summed exactly as `sum_all` sums the concatenated
// per-gradient values (grid-stride slices of norm_blocks(nseg) blocks, f64 block trees,
// block sums in order), then rounded to f32 and square-rooted in f32: the bits of
// `cat([g.sum_squares() for g]).sum_all().sqrt()`.
extern "C" __global__ void seg_norm_finish(const unsigned long long* __restrict__ t, int nseg,
                                           const double* __restrict__ partial,
                                           float* __restrict__ out) {
    const size_t nb2 = norm_blocks(nseg);
    double total = 0.0;
    for (size_t bb = 0; bb < nb2; bb++) {
        double acc = 0.0;
        for (size_t s = bb * BLOCK + threadIdx.x; s < (size_t)nseg; s += nb2 * BLOCK) {
            const size_t first = t[s * SEG_WORDS + 7];
            const size_t nb = norm_blocks(t[s * SEG_WORDS + 4]);
            double ss = 0.0;
            for (size_t b = 0; b < nb; b++) ss += partial[first + b];
            double v = (float)ss;
            acc += v;
        }
        acc = block_sum_d(acc);
        total += acc;
    }
    if (threadIdx.x == 0) out[0] = sqrtf((float)total);
}
// Four bf16 of the cast kernel's rounding (`__float2bfloat16`), packed for one 8-byte store.
__device__ __forceinline__ uint2 bf16x4(float a, float b, float c, float d) {
    const unsigned lo = (unsigned)__bfloat16_as_ushort(__float2bfloat16(a)) |
                        ((unsigned)__bfloat16_as_ushort(__float2bfloat16(b)) << 16);
    const unsigned hi = (unsigned)__bfloat16_as_ushort(__float2bfloat16(c)) |
                        ((unsigned)__bfloat16_as_ushort(__float2bfloat16(d)) << 16);
    return make_uint2(lo, hi);
}
// Four bf16 (8 bytes, streamed) widened to f32 (exact: the bf16 bits are the f32's high half).
__device__ __forceinline__ float4 ld_bf16x4(const __nv_bfloat16* p) {
    const uint2 u = __ldcs((const uint2*)p);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                       __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}
// AdamW on every segment: block b is AdamW chunk b (the u32 after the table names its
// segment s), elements (b - first chunk of s) * ADAMW_CHUNK .. + ADAMW_CHUNK of s; thread k
// updates float4 k and BLOCK + k of it (all loads issued before the math) where the chunk is
// whole and every address of s is aligned (16 bytes for f32 arrays, 8 for bf16 ones), else
// one element at a time. The gradient is scaled by scale[0] first when `scale` is set (the
// clip factor: the bits of scaling the gradient in place first); constants `with` /
// `without` by the segment's decay flag; `apply` (nullable) 0 skips everything. Where the
// segment has bf16 moments they are widened to f32, updated by the same f32 operations and
// stored rounded to nearest even (the update uses the unrounded f32 moments). Where the
// segment has a weight copy, it gets the updated weight as bf16, rounded as the tensor
// module's `cast` kernel rounds (`__float2bfloat16`). Per element the f32 operations of `adamw`.
extern "C" __global__ void __launch_bounds__(BLOCK)
adamw_segments(const unsigned long long* __restrict__ t, int nseg,
               const AdamWConsts* __restrict__ with, const AdamWConsts* __restrict__ without,
               const float* __restrict__ scale, const float* __restrict__ apply) {
    if (apply && apply[0] == 0.f) return;
    const unsigned* chunk_seg = (const unsigned*)(t + (size_t)nseg * SEG_WORDS);
    const unsigned long long* w = t + (size_t)chunk_seg[blockIdx.x] * SEG_WORDS;
    float* __restrict__ p = (float*)w[0];
    const float* __restrict__ g = (const float*)w[1];
    const size_t n = w[4];
    const AdamWConsts c = (w[5] & 1) ? *with : *without;
    const bool m16 = (w[5] & 2) != 0;
    const size_t base = (blockIdx.x - w[6]) * (size_t)ADAMW_CHUNK;
    __nv_bfloat16* cp = (__nv_bfloat16*)w[8];
    const float k = scale ? scale[0] : 1.f;
    const unsigned long long m_align = m16 ? 7 : 15;
    const bool aligned =
        ((w[0] | w[1]) & 15) == 0 && ((w[2] | w[3]) & m_align) == 0 && (w[8] & 7) == 0;
    if (aligned && base + ADAMW_CHUNK <= n) {
        float4 gv[ADAMW_VEC], pv[ADAMW_VEC], mv[ADAMW_VEC], vv[ADAMW_VEC];
#pragma unroll
        for (int u = 0; u < ADAMW_VEC; u++) {
            const size_t i = base + (size_t)(u * BLOCK + threadIdx.x) * 4;
            gv[u] = __ldcs((const float4*)(g + i));
            pv[u] = __ldcs((const float4*)(p + i));
            if (m16) {
                mv[u] = ld_bf16x4((const __nv_bfloat16*)w[2] + i);
                vv[u] = ld_bf16x4((const __nv_bfloat16*)w[3] + i);
            } else {
                mv[u] = __ldcs((const float4*)((const float*)w[2] + i));
                vv[u] = __ldcs((const float4*)((const float*)w[3] + i));
            }
        }
#pragma unroll
        for (int u = 0; u < ADAMW_VEC; u++) {
            const size_t i = base + (size_t)(u * BLOCK + threadIdx.x) * 4;
            float4 gs = gv[u];
            if (scale) {
                gs.x = __fmul_rn(gs.x, k);
                gs.y = __fmul_rn(gs.y, k);
                gs.z = __fmul_rn(gs.z, k);
                gs.w = __fmul_rn(gs.w, k);
            }
            float4 mo = mv[u], vo = vv[u], po;
            po.x = adamw_v(pv[u].x, mo.x, vo.x, gs.x, c);
            po.y = adamw_v(pv[u].y, mo.y, vo.y, gs.y, c);
            po.z = adamw_v(pv[u].z, mo.z, vo.z, gs.z, c);
            po.w = adamw_v(pv[u].w, mo.w, vo.w, gs.w, c);
            __stcs((float4*)(p + i), po);
            if (m16) {
                __stcs((uint2*)((__nv_bfloat16*)w[2] + i), bf16x4(mo.x, mo.y, mo.z, mo.w));
                __stcs((uint2*)((__nv_bfloat16*)w[3] + i), bf16x4(vo.x, vo.y, vo.z, vo.w));
            } else {
                __stcs((float4*)((float*)w[2] + i), mo);
                __stcs((float4*)((float*)w[3] + i), vo);
            }
            if (cp) *(uint2*)(cp + i) = bf16x4(po.x, po.y, po.z, po.w);
        }
        return;
    }
    const size_t end = base + ADAMW_CHUNK < n ? base + ADAMW_CHUNK : n;
    for (size_t i = base + threadIdx.x; i < end; i += BLOCK) {
        const float gi = scale ? __fmul_rn(g[i], k) : g[i];
        const float pi = m16 ? adamw_g(i, p, (__nv_bfloat16*)w[2], (__nv_bfloat16*)w[3], gi,
                                       (T*)nullptr, c)
                             : adamw_g(i, p, (float*)w[2], (float*)w[3], gi, (T*)nullptr, c);
        if (cp) cp[i] = __float2bfloat16(pi);
    }
}
