// MoE layer kernels (static-capacity mode). Compiled by NVRTC once per element type:
// ELEM is `float` (f32 parity mode) or `__nv_bfloat16` (bf16 storage, f32 math).
// Every reduction runs in a fixed order in f32: no float atomics, bitwise deterministic.
#include <cuda_bf16.h>

typedef ELEM T;

__device__ __forceinline__ float ldf(const float* p) { return *p; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void stf(float* p, float v) { *p = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

#define NEG_INF (-__int_as_float(0x7f800000))
#define MAX_PER_LANE 8 // E <= 256

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Warp arg-max, ties -> lower index (index -1 loses to any real index).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        bool take = (oi >= 0) && (i < 0 || ov > v || (ov == v && oi < i));
        if (take) { v = ov; i = oi; }
    }
}
__device__ __forceinline__ float sigmoidf_(float z) { return 1.0f / (1.0f + __expf(-z)); }

struct RouterArgs {
    int n, e, k;
    int score_fn;    // 0 softmax, 1 sigmoid
    int pre_softmax; // softmax over all experts before top-k (1) or over the chosen (0)
    int n_groups, topk_groups;
    int normalize;
    float route_scale;
};

// Per token (one warp): scores, selection (+bias, group mask), top-k, raw gates.
// Lane l holds experts l, l+32, ... Returns the chosen slots in `idx` (all lanes) and the
// raw (pre-normalisation) gates in `graw`; `s` keeps each lane's scores.
__device__ void route_token(const RouterArgs& a, const float* z, const float* bias,
                            float* s, int* idx, float* graw) {
    const int lane = threadIdx.x & 31;
    const int per = (a.e + 31) / 32;
    float zv[MAX_PER_LANE];
    float mx = NEG_INF;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        int ex = lane + 32 * i;
        zv[i] = (i < per && ex < a.e) ? z[ex] : NEG_INF;
        mx = fmaxf(mx, zv[i]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    if (a.score_fn == 0 && a.pre_softmax) {
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            int ex = lane + 32 * i;
            float v = (i < per && ex < a.e) ? __expf(zv[i] - mx) : 0.f;
            s[i] = v;
            sum += v;
        }
        sum = warp_sum(sum);
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) s[i] = s[i] / sum;
    } else if (a.score_fn == 1) {
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) s[i] = sigmoidf_(zv[i]);
    } else {
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) s[i] = zv[i];
    }
    float sel[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        int ex = lane + 32 * i;
        bool real = i < per && ex < a.e;
        sel[i] = real ? s[i] + (bias ? bias[ex] : 0.f) : NEG_INF;
    }
    if (a.n_groups > 1) {
        // group score: top-1 + top-2 of the group's selection values (top-1 alone when the
        // group has one expert); keep the best topk_groups groups (ties -> lower group).
        const int gsize = a.e / a.n_groups;
        unsigned long long keep_mask = 0ull; // groups kept (n_groups <= 64)
        float gscore_mine = NEG_INF;          // lane g holds group g's score (n_groups <= 32)
        for (int g = 0; g < a.n_groups; g++) {
            float b1 = NEG_INF, b2 = NEG_INF;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++) {
                int ex = lane + 32 * i;
                if (i < per && ex < a.e && ex / gsize == g) {
                    float v = sel[i];
                    if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
                }
            }
            // merge (b1, b2) across the warp
            for (int o = 16; o > 0; o >>= 1) {
                float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
                float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
                float n1 = fmaxf(b1, o1);
                float n2 = fmaxf(fminf(b1, o1), fmaxf(b2, o2));
                b1 = n1; b2 = n2;
            }
            float gs = gsize >= 2 ? b1 + b2 : b1;
            if (lane == g) gscore_mine = gs;
        }
        for (int t = 0; t < a.topk_groups; t++) {
            float v = (lane < a.n_groups && !((keep_mask >> lane) & 1ull)) ? gscore_mine : NEG_INF;
            int gi = (lane < a.n_groups && !((keep_mask >> lane) & 1ull)) ? lane : -1;
            warp_argmax(v, gi);
            if (gi >= 0) keep_mask |= (1ull << gi);
        }
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            int ex = lane + 32 * i;
            if (i < per && ex < a.e && !((keep_mask >> (ex / gsize)) & 1ull)) sel[i] = NEG_INF;
        }
    }
    // top-k by repeated warp arg-max (descending, ties -> lower expert index)
    for (int j = 0; j < a.k; j++) {
        float bv = NEG_INF;
        int bi = -1;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            int ex = lane + 32 * i;
            if (i < per && ex < a.e && sel[i] != NEG_INF && (bi < 0 || sel[i] > bv)) {
                bv = sel[i];
                bi = ex;
            }
        }
        warp_argmax(bv, bi);
        // every expert masked out (cannot happen with valid k and groups): expert 0
        if (bi < 0) bi = 0;
        idx[j] = bi;
        if ((bi & 31) == lane) sel[bi >> 5] = NEG_INF;
    }
    // raw gates of the chosen experts
    float cmax = NEG_INF;
    for (int j = 0; j < a.k; j++) {
        int ex = idx[j];
        float sv = __shfl_sync(0xffffffffu, s[0], ex & 31);
#pragma unroll
        for (int i = 1; i < MAX_PER_LANE; i++) {
            float t = __shfl_sync(0xffffffffu, s[i], ex & 31);
            if ((ex >> 5) == i) sv = t;
        }
        graw[j] = sv;
        cmax = fmaxf(cmax, sv);
    }
    if (a.score_fn == 0 && !a.pre_softmax) { // softmax over the chosen logits
        float cs = 0.f;
        for (int j = 0; j < a.k; j++) { graw[j] = __expf(graw[j] - cmax); cs += graw[j]; }
        for (int j = 0; j < a.k; j++) graw[j] = graw[j] / cs;
    }
}

// logits [n, e] f32 -> slots [n, k] i32, gates [n, k] f32 (normalised, scaled).
extern "C" __global__ void router_fwd(RouterArgs a, const float* __restrict__ logits,
                                      const float* __restrict__ bias, int* __restrict__ slots,
                                      float* __restrict__ gates) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= a.n) return;
    float s[MAX_PER_LANE];
    int idx[16];
    float graw[16];
    route_token(a, logits + (size_t)warp * a.e, bias, s, idx, graw);
    float tot = 0.f;
    for (int j = 0; j < a.k; j++) tot += graw[j];
    if (lane == 0) {
        for (int j = 0; j < a.k; j++) {
            float g = a.normalize ? graw[j] / (tot + 1e-20f) : graw[j];
            slots[(size_t)warp * a.k + j] = idx[j];
            gates[(size_t)warp * a.k + j] = g * a.route_scale;
        }
    }
}

// d_gates [n, k] (0 where the assignment was dropped: row_of < 0) -> d_logits [n, e]
// written fresh (f32 and in the element type for the bf16 GEMMs), the choice held fixed.
extern "C" __global__ void router_bwd(RouterArgs a, const float* __restrict__ logits,
                                      const float* __restrict__ bias, const int* __restrict__ row_of,
                                      const float* __restrict__ d_gates, T* __restrict__ d_logits) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= a.n) return;
    const int per = (a.e + 31) / 32;
    float s[MAX_PER_LANE];
    int idx[16];
    float graw[16];
    route_token(a, logits + (size_t)warp * a.e, bias, s, idx, graw);
    float dg[16];
    float tot = 0.f, dot = 0.f;
    for (int j = 0; j < a.k; j++) {
        size_t q = (size_t)warp * a.k + j;
        dg[j] = row_of[q] >= 0 ? d_gates[q] * a.route_scale : 0.f;
        tot += graw[j];
        dot += dg[j] * graw[j];
    }
    // d raw gates (through the normalisation)
    if (a.normalize) {
        float den = tot + 1e-20f;
        for (int j = 0; j < a.k; j++) dg[j] = dg[j] / den - dot / (den * den);
    }
    float dz[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) dz[i] = 0.f;
    if (a.score_fn == 1) { // sigmoid: dz = dg * s (1 - s) at the chosen experts
        for (int j = 0; j < a.k; j++) {
            int ex = idx[j];
            if ((ex & 31) == lane) {
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; i++)
                    if ((ex >> 5) == i) dz[i] = dg[j] * graw[j] * (1.f - graw[j]);
            }
        }
    } else if (a.pre_softmax) { // softmax over all: dz = s (ds - sum s ds)
        float sd = 0.f;
        for (int j = 0; j < a.k; j++) sd += graw[j] * dg[j];
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            float ds = 0.f;
            for (int j = 0; j < a.k; j++)
                if (idx[j] == lane + 32 * i) ds = dg[j];
            dz[i] = s[i] * (ds - sd);
        }
    } else { // softmax over the chosen: dz_j = p_j (dg_j - sum p dg)
        float sd = 0.f;
        for (int j = 0; j < a.k; j++) sd += graw[j] * dg[j];
        for (int j = 0; j < a.k; j++) {
            int ex = idx[j];
            if ((ex & 31) == lane) {
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; i++)
                    if ((ex >> 5) == i) dz[i] = graw[j] * (dg[j] - sd);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        int ex = lane + 32 * i;
        if (i < per && ex < a.e) stf(d_logits + (size_t)warp * a.e + ex, dz[i]);
    }
}

// Capacity assignment, one block (1024 threads) per expert: the assignments of expert e in
// (token, slot) order get positions 0, 1, ...; those below `cap` are kept (earliest-first
// drop policy). Writes row_of [n*k] (row e*cap+pos, or -1 when dropped) for the
// assignments of this expert, row_src [e*cap .. (e+1)*cap] (assignment index, -1 = pad)
// counts[e] (kept rows) and demand[e] (assignments before capacity). Deterministic: a block-wide prefix sum, no atomics.
extern "C" __global__ void assign_rows(const int* __restrict__ slots, int nk, int cap,
                                       int* __restrict__ row_of, int* __restrict__ row_src,
                                       int* __restrict__ counts, int* __restrict__ demand) {
    __shared__ int warp_tot[32];
    __shared__ int base_s;
    const int ex = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    if (tid == 0) base_s = 0;
    __syncthreads();
    for (int start = 0; start < nk; start += blockDim.x) {
        int q = start + tid;
        int flag = (q < nk && slots[q] == ex) ? 1 : 0;
        unsigned bal = __ballot_sync(0xffffffffu, flag);
        int in_warp = __popc(bal & ((1u << lane) - 1u));
        if (lane == 0) warp_tot[wid] = __popc(bal);
        __syncthreads();
        int before = 0, all = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
            int t = warp_tot[w];
            before += (w < wid) ? t : 0;
            all += t;
        }
        int pos = base_s + before + in_warp;
        if (flag) {
            if (pos < cap) {
                row_of[q] = ex * cap + pos;
                row_src[ex * cap + pos] = q;
            } else {
                row_of[q] = -1;
            }
        }
        __syncthreads();
        if (tid == 0) base_s += all;
        __syncthreads();
    }
    int kept = min(base_s, cap);
    for (int p = kept + tid; p < cap; p += blockDim.x) row_src[ex * cap + p] = -1;
    if (tid == 0) {
        counts[ex] = kept;
        demand[ex] = base_s;
    }
}

// Permute: xe [e*cap, h] <- x [n, h] rows (pad rows zero). One block per row, 16-byte copies
// (row bytes are a multiple of 16; checked by the caller).
extern "C" __global__ void gather_rows(const uint4* __restrict__ x, const int* __restrict__ row_src,
                                       int k, int row_vecs, uint4* __restrict__ xe) {
    const int r = blockIdx.x;
    const int a = row_src[r];
    uint4* dst = xe + (size_t)r * row_vecs;
    if (a < 0) {
        for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) dst[i] = make_uint4(0, 0, 0, 0);
        return;
    }
    const uint4* src = x + (size_t)(a / k) * row_vecs;
    for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) dst[i] = src[i];
}

// Vector helpers: VEC elements = 16 bytes per load / store (rows are 16-byte aligned: the
// caller checks d_model and hidden are multiples of 8).
#define VEC ((int)(16 / sizeof(T)))
struct Vf { float v[16 / sizeof(T)]; };
__device__ __forceinline__ Vf ldv(const T* p) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
    Vf out;
#pragma unroll
    for (int i = 0; i < VEC; i++) out.v[i] = ldf(e + i);
    return out;
}
__device__ __forceinline__ void stv(T* p, const Vf& x) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; i++) stf(e + i, x.v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// SwiGLU forward: gu [rows, 2f] (gate | up) -> act [rows, f] = silu(gate) * up.
extern "C" __global__ void swiglu_fwd(const T* __restrict__ gu, int rows, int f, T* __restrict__ act) {
    const int nv = f / VEC;
    const size_t total = (size_t)rows * nv;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / nv, c = (i - r * nv) * VEC;
        Vf g = ldv(gu + r * 2 * f + c), u = ldv(gu + r * 2 * f + f + c), o;
#pragma unroll
        for (int q = 0; q < VEC; q++) o.v[q] = g.v[q] * sigmoidf_(g.v[q]) * u.v[q];
        stv(act + r * f + c, o);
    }
}

// SwiGLU backward: d_act [rows, f], gu [rows, 2f] -> d_gu [rows, 2f].
extern "C" __global__ void swiglu_bwd(const T* __restrict__ gu, const T* __restrict__ d_act, int rows,
                                      int f, T* __restrict__ d_gu) {
    const int nv = f / VEC;
    const size_t total = (size_t)rows * nv;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / nv, c = (i - r * nv) * VEC;
        Vf g = ldv(gu + r * 2 * f + c), u = ldv(gu + r * 2 * f + f + c), da = ldv(d_act + r * f + c);
        Vf dg, du;
#pragma unroll
        for (int q = 0; q < VEC; q++) {
            float sg = sigmoidf_(g.v[q]);
            dg.v[q] = da.v[q] * u.v[q] * sg * (1.f + g.v[q] * (1.f - sg));
            du.v[q] = da.v[q] * g.v[q] * sg;
        }
        stv(d_gu + r * 2 * f + c, dg);
        stv(d_gu + r * 2 * f + f + c, du);
    }
}

// Combine: y [n, h] = sum over the token's kept slots (slot order) of gate * ye[row].
// One block per token; f32 accumulation; dropped slots contribute nothing.
extern "C" __global__ void combine_fwd(const T* __restrict__ ye, const int* __restrict__ row_of,
                                       const float* __restrict__ gates, int k, int h,
                                       T* __restrict__ y) {
    const int t = blockIdx.x;
    for (int c = threadIdx.x * VEC; c < h; c += blockDim.x * VEC) {
        Vf acc;
#pragma unroll
        for (int q = 0; q < VEC; q++) acc.v[q] = 0.f;
        for (int j = 0; j < k; j++) {
            int r = row_of[(size_t)t * k + j];
            if (r >= 0) {
                float g = gates[(size_t)t * k + j];
                Vf v = ldv(ye + (size_t)r * h + c);
#pragma unroll
                for (int q = 0; q < VEC; q++) acc.v[q] += g * v.v[q];
            }
        }
        stv(y + (size_t)t * h + c, acc);
    }
}

// Combine backward, one block per expert-buffer row: d_ye[row] = gate * d_y[token] (pad
// rows zero) and d_gates[assignment] = <d_y[token], ye[row]> (block reduction, fixed order).
// d_gates of dropped assignments are not written (router_bwd reads row_of instead).
extern "C" __global__ void combine_bwd(const T* __restrict__ d_y, const T* __restrict__ ye,
                                       const int* __restrict__ row_src, const float* __restrict__ gates,
                                       int k, int h, T* __restrict__ d_ye, float* __restrict__ d_gates) {
    __shared__ float part[32];
    const int r = blockIdx.x;
    const int a = row_src[r];
    T* dst = d_ye + (size_t)r * h;
    if (a < 0) {
        Vf z;
#pragma unroll
        for (int q = 0; q < VEC; q++) z.v[q] = 0.f;
        for (int c = threadIdx.x * VEC; c < h; c += blockDim.x * VEC) stv(dst + c, z);
        return;
    }
    const float g = gates[a];
    const T* dy = d_y + (size_t)(a / k) * h;
    const T* yr = ye + (size_t)r * h;
    float dot = 0.f;
    for (int c = threadIdx.x * VEC; c < h; c += blockDim.x * VEC) {
        Vf v = ldv(dy + c), w = ldv(yr + c), o;
#pragma unroll
        for (int q = 0; q < VEC; q++) {
            o.v[q] = g * v.v[q];
            dot += v.v[q] * w.v[q];
        }
        stv(dst + c, o);
    }
    dot = warp_sum(dot);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) s += part[w];
        d_gates[a] = s;
    }
}

// Un-permute the input gradient: d_x [n, h] = d_x_router [n, h] (f32) + sum over the
// token's kept slots (slot order) of d_xe[row]. One block per token.
extern "C" __global__ void scatter_dx(const T* __restrict__ d_xe, const int* __restrict__ row_of,
                                      const float* __restrict__ d_x_router, int k, int h,
                                      T* __restrict__ d_x) {
    const int t = blockIdx.x;
    for (int c = threadIdx.x * VEC; c < h; c += blockDim.x * VEC) {
        Vf acc;
        const float4* src = reinterpret_cast<const float4*>(d_x_router + (size_t)t * h + c);
#pragma unroll
        for (int q = 0; q < VEC / 4; q++) {
            float4 v4 = src[q];
            acc.v[4 * q] = v4.x;
            acc.v[4 * q + 1] = v4.y;
            acc.v[4 * q + 2] = v4.z;
            acc.v[4 * q + 3] = v4.w;
        }
        for (int j = 0; j < k; j++) {
            int r = row_of[(size_t)t * k + j];
            if (r >= 0) {
                Vf v = ldv(d_xe + (size_t)r * h + c);
#pragma unroll
                for (int q = 0; q < VEC; q++) acc.v[q] += v.v[q];
            }
        }
        stv(d_x + (size_t)t * h + c, acc);
    }
}

// Element-type conversion helpers (f32 <-> ELEM), grid-stride.
extern "C" __global__ void to_elem(const float* __restrict__ src, size_t n, T* __restrict__ dst) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        stf(dst + i, src[i]);
}
extern "C" __global__ void to_f32(const T* __restrict__ src, size_t n, float* __restrict__ dst) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = ldf(src + i);
}

// Uniform random fill with standard deviation `std` (counter-based: element i depends on
// (seed, i) only). For benchmarks: fresh non-zero data without a host round trip.
extern "C" __global__ void fill_random(T* __restrict__ dst, size_t n, unsigned long long seed, float std) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z = z ^ (z >> 31);
        float u = (float)(z >> 40) * (1.0f / 16777216.0f); // [0, 1)
        stf(dst + i, (2.f * u - 1.f) * 1.7320508f * std);
    }
}
