// MoE routing, capacity and static-buffer kernels behind megamoe-tensor's routing and
// capacity families (semantics: megamoe-tensor's CPU kernels of the same names). Header-free
// (fast NVRTC compile). Inputs read as f32 or bf16 (dt code 0 / 1), outputs f32 / i32, and the
// static-buffer row kernels (gather, combine and its backward) write f32 or bf16.
// Every sum runs in a fixed order (f64 where the CPU sums in f64); the counting sorts use
// only integer atomics on per-chunk histograms, then a fixed-order scan and an in-chunk rank:
// results are bitwise reproducible.
//
// Index checks run in release builds: a bad id sets the engine's error record
// err[0] = code (first error wins), err[1] = index, err[2] = position, err[3] = bound, read
// on the host at the next synchronising read. Codes:
//   1 slot id outside 0..bound          2 negative expert id
//   3 row id outside -1..bound          4 expert over capacity (err[1] = expert)
//   5 group counts invalid              6 group sizes outside 0..=stride
//   7..11 the index ops' ids (kernels.cu and the ops' cross-entropy; see RouteError)
//   12 a buffer row named by two assignments (combine backward)
//   13 a slot id outside 0..pool (the fused router backward, router.cu)

#define NEG_INF (-__int_as_float(0x7f800000))
#define CHUNK 256

__device__ __forceinline__ float ld_any(const void* p, int dt, size_t i) {
    if (dt == 1) {
        unsigned short b = ((const unsigned short*)p)[i];
        return __uint_as_float(((unsigned)b) << 16);
    }
    return ((const float*)p)[i];
}

__device__ void report(int* err, int code, long long index, long long pos, long long bound) {
    if (atomicCAS(err, 0, code) == 0) {
        err[1] = (int)index;
        err[2] = (int)pos;
        err[3] = (int)(bound > 2147483647LL ? 2147483647LL : bound);
    }
}

// ---- router helpers -------------------------------------------------------------------

// One thread per row: group score = top-1 (+ top-2 when a group has >= 2 members) in f64;
// the best m groups (ties -> lower group) keep their values, the rest -inf. g <= 256.
extern "C" __global__ void group_limited_mask(const float* __restrict__ sel, int rows, int e,
                                              int g, int m, float* __restrict__ out) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* row = sel + (size_t)r * e;
    float* o = out + (size_t)r * e;
    const int per = e / g;
    unsigned long long kept[4] = {0ull, 0ull, 0ull, 0ull};
    for (int pick = 0; pick < m; pick++) {
        double best = 0.0;
        int bi = -1;
        for (int gi = 0; gi < g; gi++) {
            if ((kept[gi >> 6] >> (gi & 63)) & 1ull) continue;
            float a = NEG_INF, b = NEG_INF;
            for (int j = 0; j < per; j++) {
                float v = row[gi * per + j];
                if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
            }
            double s = per >= 2 ? (double)a + (double)b : (double)a;
            // descending score, ties (and NaN, compared as equal) -> lower group
            if (bi < 0 || s > best) { best = s; bi = gi; }
        }
        kept[bi >> 6] |= 1ull << (bi & 63);
    }
    for (int j = 0; j < e; j++) {
        int gi = j / per;
        o[j] = ((kept[gi >> 6] >> (gi & 63)) & 1ull) ? row[j] : NEG_INF;
    }
}

// [rows, e] + [rows, 1] -> [rows, e + n_null] (the null logit repeated).
extern "C" __global__ void expand_null_slots(const float* __restrict__ z, const float* __restrict__ zn,
                                             int rows, int e, int n_null, float* __restrict__ out) {
    const int w = e + n_null;
    size_t total = (size_t)rows * w;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / w;
        int c = (int)(i - r * w);
        out[i] = c < e ? z[r * e + c] : zn[r];
    }
}

// d_pool [rows, w] -> d_z [rows, e] (copy), d_null [rows] (sum of the null columns, f64).
extern "C" __global__ void reduce_null_slots(const float* __restrict__ d, int rows, int e, int w,
                                             float* __restrict__ dz, float* __restrict__ dn) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* row = d + (size_t)r * w;
    for (int j = 0; j < e; j++) dz[(size_t)r * e + j] = row[j];
    double s = 0.0;
    for (int j = e; j < w; j++) s += (double)row[j];
    dn[r] = (float)s;
}

// 1 where 0 <= idx < n_real, else 0.
extern "C" __global__ void real_slot_mask(const int* __restrict__ idx, int n, int n_real,
                                          float* __restrict__ out) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = ((unsigned)idx[i] < (unsigned)n_real) ? 1.f : 0.f;
}

// out[i] = idx[i] where keep[i] != 0, else -1.
extern "C" __global__ void kept_slots(const int* __restrict__ idx, const float* __restrict__ keep,
                                      int n, int* __restrict__ out) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = keep[i] != 0.f ? idx[i] : -1;
}

// g / (sum g + eps) per row (sum in f64, as the CPU).
extern "C" __global__ void normalize_rows(const float* __restrict__ g, int rows, int k, float eps,
                                          float* __restrict__ out) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* row = g + (size_t)r * k;
    double s = 0.0;
    for (int j = 0; j < k; j++) s += (double)row[j];
    float sf = (float)(s + (double)eps);
    for (int j = 0; j < k; j++) out[(size_t)r * k + j] = row[j] / sf;
}

// dg_i = (dn_i - sum_j dn_j n_j) / S with S = sum g + eps (f64).
extern "C" __global__ void normalize_rows_bwd(const float* __restrict__ g, const float* __restrict__ dn,
                                              int rows, int k, float eps, float* __restrict__ out) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* row = g + (size_t)r * k;
    const float* drow = dn + (size_t)r * k;
    double s = 0.0;
    for (int j = 0; j < k; j++) s += (double)row[j];
    s += (double)eps;
    double dot = 0.0;
    for (int j = 0; j < k; j++) dot += ((double)row[j] / s) * (double)drow[j];
    for (int j = 0; j < k; j++) out[(size_t)r * k + j] = (float)(((double)drow[j] - dot) / s);
}

// ---- stable positions of assignments per expert (counting sort) -----------------------

// The expert of assignment a when it takes part: 0 <= idx < n_real and keep (if any) != 0;
// -1 otherwise. A negative id is reported (code 2).
__device__ __forceinline__ int part_of(const int* idx, const float* keep, int a, int n_real,
                                       int* err) {
    int e = idx[a];
    if (e < 0) {
        report(err, 2, e, a, 2147483647LL);
        return -1;
    }
    if (e >= n_real) return -1;
    if (keep && keep[a] == 0.f) return -1;
    return e;
}

// hist [chunks, n_real] (zeroed): assignments per (chunk of 256, expert).
extern "C" __global__ void route_hist(const int* __restrict__ idx, const float* __restrict__ keep,
                                      int n, int n_real, int* __restrict__ hist, int* err) {
    int a = blockIdx.x * CHUNK + threadIdx.x;
    if (a >= n) return;
    int e = part_of(idx, keep, a, n_real, err);
    if (e >= 0) atomicAdd(&hist[(size_t)blockIdx.x * n_real + e], 1);
}

// Per expert, in chunk order: hist becomes the exclusive prefix over chunks; counts[e] = total.
// One warp per expert scans 32 chunks per step (integer shuffles: the serial loop's values).
extern "C" __global__ void route_scan(int* __restrict__ hist, int chunks, int n_real,
                                      int* __restrict__ counts) {
    const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (e >= n_real) return; // uniform per warp
    int run = 0;
    for (int c0 = 0; c0 < chunks; c0 += 32) {
        const int c = c0 + lane;
        const int v = c < chunks ? hist[(size_t)c * n_real + e] : 0;
        int x = v; // inclusive scan over the warp's 32 chunks
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (c < chunks) hist[(size_t)c * n_real + e] = run + x - v;
        run += __shfl_sync(0xffffffffu, x, 31);
    }
    if (lane == 0) counts[e] = run;
}

// pos[a] = position of assignment a among its expert's (in flat order), -1 if not taking part.
extern "C" __global__ void route_place(const int* __restrict__ idx, const float* __restrict__ keep,
                                       int n, int n_real, const int* __restrict__ hist,
                                       int* __restrict__ pos) {
    __shared__ int se[CHUNK];
    int a = blockIdx.x * CHUNK + threadIdx.x;
    int e = -1;
    if (a < n) {
        int v = idx[a];
        if (v >= 0 && v < n_real && !(keep && keep[a] == 0.f)) e = v;
    }
    se[threadIdx.x] = e;
    __syncthreads();
    if (a >= n) return;
    if (e < 0) {
        pos[a] = -1;
        return;
    }
    int rank = 0;
    for (int i = 0; i < (int)threadIdx.x; i++) rank += (se[i] == e);
    pos[a] = hist[(size_t)blockIdx.x * n_real + e] + rank;
}

// Earliest-first capacity: keep = 1 for a real assignment at position < cap (cap < 0: all).
extern "C" __global__ void keep_earliest(const int* __restrict__ pos, int n, int cap,
                                         float* __restrict__ keep) {
    for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < n; a += gridDim.x * blockDim.x) {
        int p = pos[a];
        keep[a] = (p >= 0 && (cap < 0 || p < cap)) ? 1.f : 0.f;
    }
}

// list[off[e] + pos[a]] = a: each expert's assignments in flat order; keep[a] = 0 for an
// assignment that takes no part (null slot, or a real id past n_real).
extern "C" __global__ void route_list(const int* __restrict__ idx, const int* __restrict__ pos, int n,
                                      const int* __restrict__ off, int* __restrict__ list,
                                      float* __restrict__ keep) {
    for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < n; a += gridDim.x * blockDim.x) {
        int p = pos[a];
        if (p >= 0) list[off[idx[a]] + p] = a;
        else keep[a] = 0.f;
    }
}

// Order-preserving u32 key of a gate: a larger gate gives a larger key; -0 and +0 share one
// key (they compare equal, as on the CPU); NaN gets the lowest key.
__device__ __forceinline__ unsigned gate_key(float g) {
    if (g != g) return 0u;
    unsigned u = __float_as_uint(g == 0.f ? 0.f : g);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define SEL_THREADS 1024

// Highest-gate capacity, one block (SEL_THREADS) per expert e over its list (flat order):
// an expert with at most cap assignments keeps all; otherwise a 4-pass 8-bit radix select
// finds the cap-th largest key K (integer shared histograms: exact), and the block keeps every
// key > K plus the first `cap - #{key > K}` keys == K in list order (a block-wide ordered
// ballot scan). That is exactly the kept set of a stable sort by descending gate with ties
// broken by the lower flat index: O(count) per expert instead of a per-assignment rank.
extern "C" __global__ void keep_select(const float* __restrict__ gates, int cap,
                                       const int* __restrict__ counts, const int* __restrict__ off,
                                       const int* __restrict__ list, float* __restrict__ keep) {
    __shared__ int hist[256];
    __shared__ int wsum[SEL_THREADS / 32];
    __shared__ unsigned s_key;
    __shared__ int s_left, s_total;
    const int e = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ne = counts[e];
    const int* l = list + off[e];
    if (ne <= cap) {
        for (int i = tid; i < ne; i += blockDim.x) keep[l[i]] = 1.f;
        return;
    }
    if (cap <= 0) {
        for (int i = tid; i < ne; i += blockDim.x) keep[l[i]] = 0.f;
        return;
    }
    unsigned prefix = 0u, mask = 0u;
    int left = cap; // rank (1-based, descending) of the wanted key among those matching prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = tid; i < ne; i += blockDim.x) {
            unsigned k = gate_key(gates[l[i]]);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
        }
        __syncthreads();
        if (tid == 0) {
            int above = 0, b = 255;
            for (; b > 0; b--) {
                if (above + hist[b] >= left) break;
                above += hist[b];
            }
            s_key = prefix | ((unsigned)b << shift);
            s_left = left - above;
        }
        __syncthreads();
        prefix = s_key;
        left = s_left;
        mask |= 255u << shift;
    }
    // prefix = K; keep the first `left` keys equal to K (in list order) and every larger key.
    const int nw = (blockDim.x + 31) >> 5;
    int carry = 0;
    for (int base = 0; base < ne; base += blockDim.x) {
        const int i = base + tid;
        const unsigned k = i < ne ? gate_key(gates[l[i]]) : 0u;
        const bool eq = i < ne && k == prefix;
        const unsigned bal = __ballot_sync(0xffffffffu, eq);
        const int before = __popc(bal & ((1u << lane) - 1u));
        if (lane == 0) wsum[warp] = __popc(bal);
        __syncthreads();
        if (warp == 0) {
            int v = lane < nw ? wsum[lane] : 0;
            int inc = v;
            for (int o = 1; o < 32; o <<= 1) {
                int t = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += t;
            }
            if (lane < nw) wsum[lane] = inc - v;
            if (lane == 31) s_total = inc;
        }
        __syncthreads();
        const int r = carry + wsum[warp] + before;
        if (i < ne) keep[l[i]] = (k > prefix || (eq && r < left)) ? 1.f : 0.f;
        carry += s_total;
        __syncthreads();
    }
}

// Static layout: slot_row[a] = e*cap + pos (or -1), row_token[e*cap + pos] = a / k (row_token
// pre-filled with -1). A position at or past cap is reported (code 4).
extern "C" __global__ void capacity_place(const int* __restrict__ idx, const int* __restrict__ pos,
                                          int n, int k, int cap, int* __restrict__ slot_row,
                                          int* __restrict__ row_token, int* err) {
    for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < n; a += gridDim.x * blockDim.x) {
        int p = pos[a];
        int r = -1;
        if (p >= 0) {
            int e = idx[a];
            if (p < cap) {
                r = e * cap + p;
                row_token[r] = a / k;
            } else {
                report(err, 4, e, a, cap);
            }
        }
        slot_row[a] = r;
    }
}

// counts[e] = min(counts[e], cap) (the kept rows of an over-capacity expert, already reported).
extern "C" __global__ void clamp_counts(int* __restrict__ counts, int n, int cap) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        counts[i] = min(counts[i], cap);
}

// Packed layout: token[off[e] + pos] = a / k, assignment[...] = a, slot_row[a] = that row
// (-1 where a takes no part).
extern "C" __global__ void sort_place(const int* __restrict__ idx, const int* __restrict__ pos, int n,
                                      int k, const int* __restrict__ off, int* __restrict__ token,
                                      int* __restrict__ assignment, int* __restrict__ slot_row) {
    for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < n; a += gridDim.x * blockDim.x) {
        int p = pos[a];
        int r = -1;
        if (p >= 0) {
            r = off[idx[a]] + p;
            token[r] = a / k;
            assignment[r] = a;
        }
        slot_row[a] = r;
    }
}

// Slot counts per segment: cnt [segs, n_slots] (zeroed) += 1 per counted assignment; i32, or
// f32 when f32_out (n < 2^24: every partial sum is an integer below 2^24, so the float adds
// are exact in any order: the i32 counts converted, bit for bit).
// One segment of at most SLOT_SHARED slots (the router's totals): each block counts into
// shared memory first, then adds its nonzero bins (integer sums: the same counts either way,
// with far fewer atomics on the few global bins).
#define SLOT_SHARED 1024
__device__ __forceinline__ void count_add(void* cnt, int f32_out, size_t i, int v) {
    if (f32_out)
        atomicAdd((float*)cnt + i, (float)v);
    else
        atomicAdd((int*)cnt + i, v);
}
extern "C" __global__ void slot_counts(const int* __restrict__ idx, const float* __restrict__ keep,
                                       int n, int k, int seg, int n_slots, void* cnt,
                                       int f32_out, int* err) {
    __shared__ int local[SLOT_SHARED];
    const bool shared = (long long)k * seg >= (long long)n && n_slots <= SLOT_SHARED;
    if (shared) {
        for (int s = threadIdx.x; s < n_slots; s += blockDim.x) local[s] = 0;
        __syncthreads();
    }
    for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < n; a += gridDim.x * blockDim.x) {
        int s = idx[a];
        if (s < 0 || s >= n_slots) {
            report(err, 1, s, a, n_slots);
            continue;
        }
        if (keep && keep[a] == 0.f) continue;
        if (shared)
            atomicAdd(&local[s], 1);
        else
            count_add(cnt, f32_out, (size_t)(a / k / seg) * n_slots + s, 1);
    }
    if (shared) {
        __syncthreads();
        for (int s = threadIdx.x; s < n_slots; s += blockDim.x)
            if (local[s] != 0) count_add(cnt, f32_out, s, local[s]);
    }
}

// Loss-free balancing step (one thread: E is small): delta_i = rate * sign(mean - c_i), minus
// mean(delta) when centre (means in f64).
extern "C" __global__ void expert_bias_step(const float* __restrict__ c, int n, float rate, int centre,
                                            float* __restrict__ out) {
    if (blockIdx.x != 0 || threadIdx.x != 0 || n == 0) return;
    double mean = 0.0;
    for (int i = 0; i < n; i++) mean += (double)c[i];
    mean /= (double)n;
    double dsum = 0.0;
    for (int i = 0; i < n; i++) {
        double diff = mean - (double)c[i];
        float d = diff > 0.0 ? rate : (diff < 0.0 ? -rate : 0.f);
        out[i] = d;
        dsum += (double)d;
    }
    if (centre) {
        float m = (float)(dsum / (double)n);
        for (int i = 0; i < n; i++) out[i] = out[i] - m;
    }
}

// ---- static buffers ---------------------------------------------------------------------

// Row kernels of the static buffers: one block per row, each thread 8 consecutive columns
// at a time (`vec` set by the caller: d % 8 == 0 and 16-byte aligned rows), else one column.
// Outputs are f32 or bf16 (`ot` / `yt`): f32 sums rounded once, as the cast kernel rounds.

// f32 -> bf16 bits, round to nearest even (NaN -> the canonical 0x7fff), as cvt.rn.bf16.f32.
__device__ __forceinline__ unsigned f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ void st_any(void* p, int dt, size_t i, float v) {
    if (dt == 1) ((unsigned short*)p)[i] = (unsigned short)f2bf(v);
    else ((float*)p)[i] = v;
}

// 8 elements from i (i % 8 == 0, 16-byte aligned base).
__device__ __forceinline__ void ld8(const void* p, int dt, size_t i, float* v) {
    if (dt == 1) {
        const uint4 w = *(const uint4*)((const unsigned short*)p + i);
        const unsigned x[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            v[2 * q] = __uint_as_float(x[q] << 16);
            v[2 * q + 1] = __uint_as_float(x[q] & 0xffff0000u);
        }
    } else {
        const float4 a = *(const float4*)((const float*)p + i);
        const float4 b = *(const float4*)((const float*)p + i + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
}

__device__ __forceinline__ void st8(void* p, int dt, size_t i, const float* v) {
    if (dt == 1) {
        uint4 w;
        w.x = f2bf(v[0]) | (f2bf(v[1]) << 16);
        w.y = f2bf(v[2]) | (f2bf(v[3]) << 16);
        w.z = f2bf(v[4]) | (f2bf(v[5]) << 16);
        w.w = f2bf(v[6]) | (f2bf(v[7]) << 16);
        *(uint4*)((unsigned short*)p + i) = w;
    } else {
        *(float4*)((float*)p + i) = make_float4(v[0], v[1], v[2], v[3]);
        *(float4*)((float*)p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// out [R, d] (type ot): row r = x[rows[r]], zero where rows[r] = -1; ids outside -1..n reported.
// dt == ot: an exact copy (16-byte words when vec); else converted (bf16 -> f32).
extern "C" __global__ void gather_rows_or_zero(const void* __restrict__ x, int dt, int n, int d,
                                               const int* __restrict__ rows, int r_count,
                                               void* __restrict__ out, int ot, int vec, int* err) {
    const int r = blockIdx.x;
    if (r >= r_count) return;
    const int s = rows[r];
    const bool ok = s >= 0 && s < n;
    if (!ok && s != -1 && threadIdx.x == 0) report(err, 3, s, (long long)r, n);
    if (vec && dt == ot) {
        // rows of d·es bytes = d / 8 (bf16) or d / 4 (f32) 16-byte words
        const int words = dt == 1 ? d >> 3 : d >> 2;
        const uint4* src = (const uint4*)x + (size_t)(ok ? s : 0) * words;
        uint4* dst = (uint4*)out + (size_t)r * words;
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        for (int c = threadIdx.x; c < words; c += blockDim.x) dst[c] = ok ? src[c] : zero;
    } else if (vec) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            if (ok) ld8(x, dt, (size_t)s * d + c, v);
            st8(out, ot, (size_t)r * d + c, v);
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x)
            st_any(out, ot, (size_t)r * d + c, ok ? ld_any(x, dt, (size_t)s * d + c) : 0.f);
    }
}

// y [t, d] (type yt) = sum over token t's kept slots, in increasing buffer row, of
// w * rows[row] (w = null: weight 1), in f32. One block per token; k <= 64 (checked by the
// caller).
extern "C" __global__ void combine_slots(const void* __restrict__ rows, int dt, int b, int d,
                                         const int* __restrict__ slot_row,
                                         const void* __restrict__ w, int wdt, int k,
                                         void* __restrict__ y, int yt, int vec, int* err) {
    __shared__ int rs[64];
    __shared__ float ws[64];
    __shared__ int nr;
    const int t = blockIdx.x;
    if (threadIdx.x == 0) {
        int m = 0;
        for (int j = 0; j < k; j++) {
            int r = slot_row[(size_t)t * k + j];
            if (r < -1 || r >= b) {
                report(err, 3, r, (long long)t * k + j, b);
                continue;
            }
            if (r < 0) continue;
            float wv = w ? ld_any(w, wdt, (size_t)t * k + j) : 1.f;
            int q = m++;
            while (q > 0 && rs[q - 1] > r) { rs[q] = rs[q - 1]; ws[q] = ws[q - 1]; q--; }
            rs[q] = r;
            ws[q] = wv;
        }
        nr = m;
    }
    __syncthreads();
    const int m = nr;
    if (vec) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int q = 0; q < m; q++) {
                float v[8];
                ld8(rows, dt, (size_t)rs[q] * d + c, v);
#pragma unroll
                for (int u = 0; u < 8; u++)
                    acc[u] = w ? __fadd_rn(acc[u], __fmul_rn(ws[q], v[u])) : __fadd_rn(acc[u], v[u]);
            }
            st8(y, yt, (size_t)t * d + c, acc);
        }
        return;
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (int q = 0; q < m; q++) {
            float v = ld_any(rows, dt, (size_t)rs[q] * d + c);
            acc = w ? __fadd_rn(acc, __fmul_rn(ws[q], v)) : __fadd_rn(acc, v);
        }
        st_any(y, yt, (size_t)t * d + c, acc);
    }
}

// Backward of the weighted combine, pass 1 over the assignments a = t*k + j: row_a[row] = a
// (row_a pre-filled with -1; a row named twice is reported, code 12) and d_w[a] = 0 (pass 2
// writes the kept ones); ids outside -1..b reported (code 3).
extern "C" __global__ void combine_rows_of(const int* __restrict__ slot_row, int n, int b,
                                           int* __restrict__ row_a, float* __restrict__ d_w,
                                           int* err) {
    for (int a = blockIdx.x * blockDim.x + threadIdx.x; a < n; a += gridDim.x * blockDim.x) {
        const int r = slot_row[a];
        d_w[a] = 0.f;
        if (r < -1 || r >= b) report(err, 3, r, a, b);
        else if (r >= 0 && atomicCAS(&row_a[r], -1, a) != -1) report(err, 12, r, a, b);
    }
}

// Pass 2, one block per buffer row r holding assignment a = row_a[r] of token t = a / k:
// d_rows[r] = w[a] * d_y[t] (type ot; zero for a row without one) and
// d_w[a] = <d_y[t], rows[r]> (f32 products summed in f64 in a fixed order).
extern "C" __global__ void combine_slots_bwd(const void* __restrict__ rows, int dt, int b, int d,
                                             const void* __restrict__ d_y, int ydt,
                                             const int* __restrict__ row_a,
                                             const void* __restrict__ w, int wdt, int k,
                                             void* __restrict__ d_rows, int ot,
                                             float* __restrict__ d_w, int vec) {
    __shared__ double part[32];
    const int r = blockIdx.x;
    if (r >= b) return;
    const int a = row_a[r];
    const size_t base = (size_t)r * d;
    if (a < 0) {
        const float z[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (vec) {
            for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) st8(d_rows, ot, base + c, z);
        } else {
            for (int c = threadIdx.x; c < d; c += blockDim.x) st_any(d_rows, ot, base + c, 0.f);
        }
        return;
    }
    const size_t tb = (size_t)(a / k) * d;
    const float wa = ld_any(w, wdt, a);
    double dot = 0.0;
    if (vec) {
        for (int c = threadIdx.x * 8; c < d; c += blockDim.x * 8) {
            float g[8], v[8], o[8];
            ld8(d_y, ydt, tb + c, g);
            ld8(rows, dt, base + c, v);
#pragma unroll
            for (int u = 0; u < 8; u++) {
                o[u] = __fmul_rn(g[u], wa);
                dot += (double)__fmul_rn(g[u], v[u]);
            }
            st8(d_rows, ot, base + c, o);
        }
    } else {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            const float g = ld_any(d_y, ydt, tb + c);
            st_any(d_rows, ot, base + c, __fmul_rn(g, wa));
            dot += (double)__fmul_rn(g, ld_any(rows, dt, base + c));
        }
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) s += part[i];
        d_w[a] = (float)s;
    }
}

// Group counts of a padded buffer: each in 0..=cap, summing to `total` (code 5 otherwise).
// One thread. off = exclusive prefix of counts.
extern "C" __global__ void check_counts(const int* __restrict__ counts, const int* __restrict__ off,
                                        int g, int cap, int total, int* err) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    long long sum = 0;
    for (int i = 0; i < g; i++) {
        int c = counts[i];
        if (c < 0 || c > cap) { report(err, 5, c, i, cap); return; }
        sum += c;
    }
    if (sum != total) report(err, 5, (int)sum, g, total);
}

// out [g*cap, d] f32: group gi's counts[gi] rows of x (packed from off[gi]), then zero rows.
extern "C" __global__ void pad_groups(const void* __restrict__ x, int dt, int x_rows, int d,
                                      const int* __restrict__ counts, const int* __restrict__ off,
                                      int g, int cap, float* __restrict__ out) {
    size_t total = (size_t)g * cap * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / d, c = i - row * d;
        int gi = (int)(row / cap), j = (int)(row - (size_t)gi * cap);
        int src = off[gi] + j;
        out[i] = (j < counts[gi] && src < x_rows) ? ld_any(x, dt, (size_t)src * d + c) : 0.f;
    }
}

// out [rows, d] f32: the counted rows of x [g*cap, d], packed.
extern "C" __global__ void unpad_groups(const void* __restrict__ x, int dt, int d,
                                        const int* __restrict__ counts, const int* __restrict__ off,
                                        int g, int cap, int rows, float* __restrict__ out) {
    size_t total = (size_t)rows * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / d);
        size_t c = i - (size_t)r * d;
        // last group starting at or before r (empty groups share the next one's offset)
        int lo = 0, hi = g - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (off[mid] <= r) lo = mid; else hi = mid - 1;
        }
        int j = r - off[lo];
        out[i] = (j >= 0 && j < cap && j < counts[lo]) ? ld_any(x, dt, ((size_t)lo * cap + j) * d + c) : 0.f;
    }
}

// ---- strided row groups (static-capacity grouped GEMMs) ----------------------------------

// Rows past each group's size in [g*stride, n] become 0; a size outside 0..=stride is
// reported (code 6).
extern "C" __global__ void zero_pad_rows(float* __restrict__ out, const int* __restrict__ sizes,
                                         int g, int stride, int n, int* err) {
    size_t total = (size_t)g * stride * n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / n;
        int gi = (int)(row / stride), j = (int)(row - (size_t)gi * stride);
        int s = sizes[gi];
        if ((s < 0 || s > stride) && j == 0 && i % n == 0) report(err, 6, s, gi, stride);
        if (j >= s) out[i] = 0.f;
    }
}

// out = beta * out + tmp over n elements (beta = 0: out = tmp, never 0 * NaN).
extern "C" __global__ void axpby(float* __restrict__ out, const float* __restrict__ tmp, size_t n,
                                 float beta) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = beta == 0.f ? tmp[i] : __fadd_rn(__fmul_rn(beta, out[i]), tmp[i]);
}

// dst = src on the rows inside each group, 0 elsewhere ([g*stride, n], element size es bytes).
extern "C" __global__ void mask_rows(const void* __restrict__ src, void* __restrict__ dst, int es,
                                     const int* __restrict__ sizes, int g, int stride, int n) {
    size_t total = (size_t)g * stride * n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / n;
        int gi = (int)(row / stride), j = (int)(row - (size_t)gi * stride);
        bool in = j < sizes[gi];
        if (es == 2) ((unsigned short*)dst)[i] = in ? ((const unsigned short*)src)[i] : 0;
        else ((unsigned*)dst)[i] = in ? ((const unsigned*)src)[i] : 0u;
    }
}

// off = exclusive prefix of counts (one thread: n is the expert count).
extern "C" __global__ void offsets_of(const int* __restrict__ counts, int n, int* __restrict__ off) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int run = 0;
    for (int i = 0; i < n; i++) { off[i] = run; run += counts[i]; }
}

// y[..n] = v (i32).
extern "C" __global__ void fill_i32(int* __restrict__ y, int n, int v) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = v;
}
