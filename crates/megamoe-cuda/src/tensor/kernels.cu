// Kernels behind megamoe-tensor's op families (elementwise, broadcasts, reductions,
// softmax, top-k, index and copy ops). Element types are run-time codes (0 f32, 1 bf16,
// 2 i32), uniform per launch, so one module serves every dtype combination: these kernels
// are memory-bound and the branch is free. Math in f32, sums in f64, fixed order: no float
// atomics, bitwise reproducible. Every reducing kernel runs with exactly BLOCK threads.
#include <cuda_bf16.h>

#define BLOCK 256
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float ld(const void* p, int dt, size_t i) {
    if (dt == 0) return ((const float*)p)[i];
    if (dt == 1) return __bfloat162float(((const __nv_bfloat16*)p)[i]);
    return (float)((const int*)p)[i];
}
__device__ __forceinline__ void st(void* p, int dt, size_t i, float v) {
    if (dt == 0) ((float*)p)[i] = v;
    else if (dt == 1) ((__nv_bfloat16*)p)[i] = __float2bfloat16(v);
    else ((int*)p)[i] = (int)v;
}

#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)BLOCK + threadIdx.x; i < (n); i += (size_t)gridDim.x * BLOCK)

// Device index checks (release builds too): a bad id sets the caller's error record
// err[0] = code (first error wins), err[1] = index, err[2] = position, err[3] = bound (the
// codes of routing.cu's record, decoded by `RouteError`); the kernel skips the id.
__device__ void report_index(int* err, int code, long long index, long long pos, long long bound) {
    if (atomicCAS(err, 0, code) == 0) {
        err[1] = (int)index;
        err[2] = (int)pos;
        err[3] = (int)(bound > 2147483647LL ? 2147483647LL : bound);
    }
}

__device__ __forceinline__ float sigmoid_(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x);
    return e / (1.f + e);
}
#define SQRT_2_OVER_PI 0.7978846f
#define INV_SQRT_2PI 0.3989422804014327

__device__ float unary_f(int op, float v, float mul, float add) {
    switch (op) {
    case 0: return -v;
    case 1: return fabsf(v);
    case 2: return expf(v);
    case 3: return logf(v);
    case 4: return sqrtf(v);
    case 5: return 1.f / v;
    case 6: return v * v;
    case 7: return sigmoid_(v);
    case 8: return tanhf(v);
    case 9: return v * sigmoid_(v);
    case 10: { double x = v; return (float)(0.5 * x * (1.0 + erf(x * 0.7071067811865476))); }
    case 11: { float u = SQRT_2_OVER_PI * (v + 0.044715f * v * v * v); return 0.5f * v * (1.f + tanhf(u)); }
    case 12: return fmaxf(v, 0.f);
    case 13: { float r = fmaxf(v, 0.f); return r * r; }
    default: return __fadd_rn(__fmul_rn(v, mul), add);
    }
}

__device__ float binary_f(int op, float a, float b) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return a / b;
    case 4: return fmaxf(a, b);
    case 5: return fminf(a, b);
    case 6: { float s = sigmoid_(a); return b * (s * (1.f + a * (1.f - s))); }
    case 7: {
        double x = a;
        double cdf = 0.5 * (1.0 + erf(x * 0.7071067811865476));
        double pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
        return b * (float)(cdf + x * pdf);
    }
    case 8: {
        float u = SQRT_2_OVER_PI * (a + 0.044715f * a * a * a);
        float t = tanhf(u);
        return b * (0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * SQRT_2_OVER_PI * (1.f + 3.f * 0.044715f * a * a));
    }
    case 9: return b * a * (1.f - a);
    case 10: return b * (1.f - a * a);
    case 11: return a > 0.f ? b : 0.f;
    case 12: return 2.f * fmaxf(a, 0.f) * b;
    default: return a * sigmoid_(a) * b; // 13: swiglu, silu(gate) * up

    }
}

// y = cast(x): any dtype to any dtype (f32 -> i32 truncates).
extern "C" __global__ void cast(const void* x, int xt, void* y, int yt, size_t n) {
    GRID_STRIDE(i, n) {
        if (xt == 2 && yt == 2) ((int*)y)[i] = ((const int*)x)[i];
        else st(y, yt, i, ld(x, xt, i));
    }
}

extern "C" __global__ void fill(void* y, int yt, size_t n, float v) {
    GRID_STRIDE(i, n) st(y, yt, i, v);
}

extern "C" __global__ void unary(int op, float mul, float add, const void* x, int xt, void* y,
                                 int yt, size_t n) {
    GRID_STRIDE(i, n) st(y, yt, i, unary_f(op, ld(x, xt, i), mul, add));
}

// 8 elements from i (i % 8 == 0, 16-byte aligned base), f32 or bf16.
__device__ __forceinline__ void ld8(const void* p, int dt, size_t i, float* v);
// 8 elements to i (as `st` rounds: f32, or bf16 by __float2bfloat16).
__device__ __forceinline__ void st8(void* p, int dt, size_t i, const float* v);

// y[i] = op(a[i], alpha * b[j]), j by broadcast mode: 0 same index, 1 row (i % h),
// 2 column (i / h), 3 scalar (0). `y` may be `a` (in place). With `vec` (mode 0, float
// types, n % 8 == 0, 16-byte aligned a, b, y) 8 consecutive elements per thread step
// (16-byte bf16 accesses; the residual-stream sums are [N, H] bf16): the same formula per
// element, so the same bits.
extern "C" __global__ void binary(int op, const void* a, int at, const void* b, int bt, void* y,
                                  int yt, size_t n, int mode, size_t h, float alpha, int vec) {
    if (vec) {
        GRID_STRIDE(c, n >> 3) {
            const size_t i = c << 3;
            float av[8], bv[8];
            ld8(a, at, i, av);
            ld8(b, bt, i, bv);
#pragma unroll
            for (int q = 0; q < 8; q++) {
                if (alpha != 1.f) bv[q] = __fmul_rn(alpha, bv[q]);
                av[q] = binary_f(op, av[q], bv[q]);
            }
            st8(y, yt, i, av);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        size_t j = mode == 0 ? i : mode == 1 ? i % h : mode == 2 ? i / h : 0;
        float bv = ld(b, bt, j);
        if (alpha != 1.f) bv = __fmul_rn(alpha, bv);
        st(y, yt, i, binary_f(op, ld(a, at, i), bv));
    }
}

// 0/1 masks: op 0 gt (x > v), 1 eq (x == v; i32 compared exactly).
extern "C" __global__ void compare_scalar(int op, const void* x, int xt, float* y, size_t n, float v) {
    GRID_STRIDE(i, n) {
        bool r;
        if (op == 0) r = ld(x, xt, i) > v;
        else if (xt == 2) r = ((const int*)x)[i] == (int)v;
        else r = ld(x, xt, i) == v;
        y[i] = r ? 1.f : 0.f;
    }
}

extern "C" __global__ void where_cond(const void* c, int ct, const void* a, int at, const void* b,
                                      int bt, float* y, size_t n) {
    GRID_STRIDE(i, n) y[i] = ld(c, ct, i) != 0.f ? ld(a, at, i) : ld(b, bt, i);
}

extern "C" __global__ void add_i32(const int* a, const int* b, int* y, size_t n) {
    GRID_STRIDE(i, n) y[i] = (int)((unsigned)a[i] + (unsigned)b[i]);
}

// out[g] = sum_{i<g} x[i] (one block, fixed order); *overflow = 1 if a partial sum leaves i32.
extern "C" __global__ void exclusive_cumsum_i32(const int* x, int* out, int n, int* overflow) {
    if (threadIdx.x != 0) return;
    long long s = 0;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        out[i] = (int)s;
        s += x[i];
        if (s > 2147483647LL || s < -2147483648LL) bad = 1;
    }
    *overflow = bad;
}

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
__device__ float block_max_f(float v) {
    __shared__ float s[BLOCK];
    __syncthreads();
    s[threadIdx.x] = v;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] = fmaxf(s[threadIdx.x], s[threadIdx.x + o]);
        __syncthreads();
    }
    return s[0];
}

// Per row of x [rows, len] -> y[row] (f32): op 0 sum, 1 mean, 2 max (NaN-ignoring, -inf if
// empty), 3 logsumexp, 4 sum of squares, 5 sqrt(sum of squares). One block per row.
extern "C" __global__ void reduce_rows(int op, const void* x, int xt, float* y, size_t len) {
    const size_t row = blockIdx.x;
    const size_t base = row * len;
    if (op == 2 || op == 3) {
        float m = NEG_INF;
        for (size_t j = threadIdx.x; j < len; j += BLOCK) {
            float v = ld(x, xt, base + j);
            if (!(v != v)) m = fmaxf(m, v);
        }
        m = block_max_f(m);
        if (op == 2) {
            if (threadIdx.x == 0) y[row] = m;
            return;
        }
        if (m == NEG_INF) {
            if (threadIdx.x == 0) y[row] = NEG_INF;
            return;
        }
        double s = 0.0;
        for (size_t j = threadIdx.x; j < len; j += BLOCK) s += exp((double)(ld(x, xt, base + j) - m));
        s = block_sum_d(s);
        if (threadIdx.x == 0) y[row] = (float)((double)m + log(s));
        return;
    }
    double s = 0.0;
    for (size_t j = threadIdx.x; j < len; j += BLOCK) {
        double v = ld(x, xt, base + j);
        s += (op >= 4) ? v * v : v;
    }
    s = block_sum_d(s);
    if (threadIdx.x == 0) {
        double r = op == 1 ? s / (double)len : op == 5 ? sqrt(s) : s;
        y[row] = (float)r;
    }
}

// Column sums, pass 1: partial[chunk, j] = sum of x[r, j] over the chunk's rows (f64).
// grid = tiles * chunks, column tile fastest.
extern "C" __global__ void col_sum_partial(const void* x, int xt, double* partial, int rows, int h,
                                           int per) {
    const int tiles = (h + BLOCK - 1) / BLOCK;
    const int chunk = blockIdx.x / tiles;
    const int j = (blockIdx.x % tiles) * BLOCK + threadIdx.x;
    if (j >= h) return;
    const int r1 = min(rows, (chunk + 1) * per);
    double acc = 0.0;
    for (int r = chunk * per; r < r1; r++) acc += ld(x, xt, (size_t)r * h + j);
    partial[(size_t)chunk * h + j] = acc;
}

// Pass 2: y[j] = sum over chunks in order (f32 out).
extern "C" __global__ void col_sum_finish(const double* partial, float* y, int chunks, int h) {
    const int j = blockIdx.x * BLOCK + threadIdx.x;
    if (j >= h) return;
    double acc = 0.0;
    for (int c = 0; c < chunks; c++) acc += partial[(size_t)c * h + j];
    y[j] = (float)acc;
}

// Row softmax over x [rows, len] (op 0 softmax, 1 log_softmax) into y (f32 or bf16).
extern "C" __global__ void softmax_rows(int op, const void* x, int xt, void* y, int yt, size_t len) {
    const size_t base = blockIdx.x * len;
    float m = NEG_INF;
    for (size_t j = threadIdx.x; j < len; j += BLOCK) m = fmaxf(m, ld(x, xt, base + j));
    m = block_max_f(m);
    double s = 0.0;
    for (size_t j = threadIdx.x; j < len; j += BLOCK) s += exp((double)(ld(x, xt, base + j) - m));
    s = block_sum_d(s);
    if (op == 0) {
        const double inv = 1.0 / s;
        for (size_t j = threadIdx.x; j < len; j += BLOCK)
            st(y, yt, base + j, (float)(exp((double)(ld(x, xt, base + j) - m)) * inv));
    } else {
        const double lse = (double)m + log(s);
        for (size_t j = threadIdx.x; j < len; j += BLOCK)
            st(y, yt, base + j, (float)((double)ld(x, xt, base + j) - lse));
    }
}

// Backward from the output y and dy: op 0 softmax dx = y (dy - <y, dy>);
// op 1 log_softmax dx = dy - e^y sum(dy).
extern "C" __global__ void softmax_rows_bwd(int op, const void* y, int yt, const void* dy, int dt,
                                            void* dx, int xt, size_t len) {
    const size_t base = blockIdx.x * len;
    double s = 0.0;
    for (size_t j = threadIdx.x; j < len; j += BLOCK) {
        double d = ld(dy, dt, base + j);
        s += op == 0 ? (double)ld(y, yt, base + j) * d : d;
    }
    s = block_sum_d(s);
    for (size_t j = threadIdx.x; j < len; j += BLOCK) {
        double yv = ld(y, yt, base + j), d = ld(dy, dt, base + j);
        st(dx, xt, base + j, (float)(op == 0 ? yv * (d - s) : d - exp(yv) * s));
    }
}

// true if (va, ia) comes before (vb, ib): descending value, NaN first, ties to lower index.
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) {
    bool na = va != va, nb = vb != vb;
    if (na != nb) return na;
    if (!na && va != vb) return va > vb;
    return ia < ib;
}

// Top-k of each row of x [rows, len]: one thread per row, k passes, each picking the best
// element after the previous pick in top-k order (a total order: no marks needed).
extern "C" __global__ void topk_rows(const void* x, int xt, float* vals, int* idx, int rows,
                                     int len, int k) {
    const int r = blockIdx.x * BLOCK + threadIdx.x;
    if (r >= rows) return;
    const size_t base = (size_t)r * len;
    float pv = 0.f;
    int pi = -1;
    for (int t = 0; t < k; t++) {
        float bv = 0.f;
        int bi = -1;
        for (int j = 0; j < len; j++) {
            float v = ld(x, xt, base + j);
            if (pi >= 0 && !before(pv, pi, v, j)) continue;
            if (bi < 0 || before(v, j, bv, bi)) { bv = v; bi = j; }
        }
        vals[(size_t)r * k + t] = bv;
        idx[(size_t)r * k + t] = bi;
        pv = bv;
        pi = bi;
    }
}

// Row gather of raw bytes: out[r] = x[idx[r]] (rows of `row_bytes`, a multiple of 4).
// out[r] = x[idx[r]] (rows of row_words u32 / row_elems u16; one block per out row); an id
// outside 0..n (x's rows) is reported (code 7) and its row zeroed.
extern "C" __global__ void gather_rows(const unsigned* x, const int* idx, unsigned* out, int n,
                                       size_t row_words, int* err) {
    const int r = blockIdx.x;
    const int s = idx[r];
    const bool ok = s >= 0 && s < n;
    if (!ok && threadIdx.x == 0) report_index(err, 7, s, r, n);
    const size_t src = (size_t)s * row_words;
    for (size_t j = threadIdx.x; j < row_words; j += BLOCK) out[(size_t)r * row_words + j] = ok ? x[src + j] : 0u;
}
extern "C" __global__ void gather_rows_u16(const unsigned short* x, const int* idx,
                                           unsigned short* out, int n, size_t row_elems,
                                           int* err) {
    const int r = blockIdx.x;
    const int s = idx[r];
    const bool ok = s >= 0 && s < n;
    if (!ok && threadIdx.x == 0) report_index(err, 7, s, r, n);
    const size_t src = (size_t)s * row_elems;
    for (size_t j = threadIdx.x; j < row_elems; j += BLOCK) out[(size_t)r * row_elems + j] = ok ? x[src + j] : (unsigned short)0;
}

// out[n, j] = x[n, idx[n, j]] for x [N, E], idx [N, k] (f32 out); an id outside 0..E is
// reported (code 9) and reads 0.
extern "C" __global__ void gather_cols(const void* x, int xt, const int* idx, float* out, size_t n,
                                       int e, int k, int* err) {
    GRID_STRIDE(i, n * k) {
        const int c = idx[i];
        if (c < 0 || c >= e) {
            report_index(err, 9, c, (long long)i, e);
            out[i] = 0.f;
        } else {
            out[i] = ld(x, xt, (i / k) * e + c);
        }
    }
}

// out [N, E] = 0 except out[n, idx[n, j]] += src[n, j], j increasing. One thread per row; an
// id outside 0..E is reported (code 10) and skipped.
extern "C" __global__ void scatter_cols(const void* src, int st_, const int* idx, float* out,
                                        int n, int e, int k, int* err) {
    const int r = blockIdx.x * BLOCK + threadIdx.x;
    if (r >= n) return;
    for (int j = 0; j < e; j++) out[(size_t)r * e + j] = 0.f;
    for (int j = 0; j < k; j++) {
        const int c = idx[(size_t)r * k + j];
        if (c < 0 || c >= e) {
            report_index(err, 10, c, (long long)r * k + j, e);
            continue;
        }
        out[(size_t)r * e + c] += ld(src, st_, (size_t)r * k + j);
    }
}

// General permute copy of a rank <= 6 tensor: out index -> in offset via strides.
struct PermuteArgs {
    int rank;
    long long out_dims[6];
    long long in_strides[6]; // stride in the input of each output dimension
};
extern "C" __global__ void permute_copy(const void* x, void* y, int elem_bytes, size_t n, PermuteArgs a) {
    GRID_STRIDE(i, n) {
        size_t rem = i, off = 0;
        for (int d = a.rank - 1; d >= 0; d--) {
            size_t c = rem % a.out_dims[d];
            rem /= a.out_dims[d];
            off += c * a.in_strides[d];
        }
        if (elem_bytes == 4) ((unsigned*)y)[i] = ((const unsigned*)x)[off];
        else ((unsigned short*)y)[i] = ((const unsigned short*)x)[off];
    }
}

// ---- Deterministic row scatter-add: dst[idx[r]] += w[r] * src[r], sources in increasing r.
// A stable LSD radix sort of the destination ids (8-bit digits; SORT_CHUNK ids per block,
// warp match + per-warp digit counts for the in-chunk rank, one exclusive scan of the
// digit-major chunk histogram per pass: integer work only), then each destination's segment
// of the sorted sources is summed in order. O(n) per pass instead of a per-source rank.
#define SORT_CHUNK 1024

// key[i] = idx[i] when in 0..m, else m (reported, code 8: that source is skipped); val[i] = i.
extern "C" __global__ void index_keys(const int* __restrict__ idx, int n, int m, int* __restrict__ key,
                                      int* __restrict__ val, int* err) {
    for (int i = blockIdx.x * BLOCK + threadIdx.x; i < n; i += gridDim.x * BLOCK) {
        const int d = idx[i];
        const bool ok = d >= 0 && d < m;
        if (!ok) report_index(err, 8, d, i, m);
        key[i] = ok ? d : m;
        val[i] = i;
    }
}

// One pass, block = one chunk of SORT_CHUNK keys (blockDim = SORT_CHUNK): hist[digit * chunks
// + chunk] = the digit's count in the chunk; rank[i] = earlier keys of the chunk with its digit.
extern "C" __global__ void sort_digits(const int* __restrict__ key, int n, int shift, int chunks,
                                       int* __restrict__ hist, int* __restrict__ rank) {
    __shared__ int wc[SORT_CHUNK / 32][256];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int j = tid; j < (SORT_CHUNK / 32) * 256; j += SORT_CHUNK) (&wc[0][0])[j] = 0;
    __syncthreads();
    const int i = blockIdx.x * SORT_CHUNK + tid;
    const int d = i < n ? (key[i] >> shift) & 255 : 256;
    const unsigned peers = __match_any_sync(0xffffffffu, d);
    const int before = __popc(peers & ((1u << lane) - 1u));
    if (d < 256 && before == 0) wc[warp][d] = __popc(peers);
    __syncthreads();
    if (tid < 256) {
        int run = 0;
        for (int w = 0; w < SORT_CHUNK / 32; w++) {
            const int c = wc[w][tid];
            wc[w][tid] = run;
            run += c;
        }
        hist[(size_t)tid * chunks + blockIdx.x] = run;
    }
    __syncthreads();
    if (i < n) rank[i] = wc[warp][d] + before;
}

// In-place exclusive prefix sum of a[s] (one block of SORT_CHUNK threads, fixed order).
extern "C" __global__ void scan_excl(int* __restrict__ a, int s) {
    __shared__ int ws[32];
    __shared__ int total;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int carry = 0;
    for (int base = 0; base < s; base += SORT_CHUNK) {
        const int i = base + tid;
        const int v = i < s ? a[i] : 0;
        int inc = v;
        for (int o = 1; o < 32; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += t;
        }
        if (lane == 31) ws[warp] = inc;
        __syncthreads();
        if (warp == 0) {
            const int w = ws[lane];
            int wi = w;
            for (int o = 1; o < 32; o <<= 1) {
                const int t = __shfl_up_sync(0xffffffffu, wi, o);
                if (lane >= o) wi += t;
            }
            ws[lane] = wi - w;
            if (lane == 31) total = wi;
        }
        __syncthreads();
        if (i < s) a[i] = carry + ws[warp] + inc - v;
        carry += total;
        __syncthreads();
    }
}

// Scatter of one pass: key/val to their stable place (hist scanned).
extern "C" __global__ void sort_scatter(const int* __restrict__ key, const int* __restrict__ val, int n,
                                        int shift, int chunks, const int* __restrict__ hist,
                                        const int* __restrict__ rank, int* __restrict__ key_out,
                                        int* __restrict__ val_out) {
    const int i = blockIdx.x * SORT_CHUNK + threadIdx.x;
    if (i >= n) return;
    const int k = key[i];
    const int p = hist[(size_t)((k >> shift) & 255) * chunks + blockIdx.x] + rank[i];
    key_out[p] = k;
    val_out[p] = val[i];
}

// Segment bounds of the sorted keys: first[d] .. last[d] (exclusive) for every d < m present
// (both pre-zeroed: an absent destination has an empty segment).
extern "C" __global__ void segment_bounds(const int* __restrict__ key, int n, int m,
                                          int* __restrict__ first, int* __restrict__ last) {
    for (int i = blockIdx.x * BLOCK + threadIdx.x; i < n; i += gridDim.x * BLOCK) {
        const int k = key[i];
        if (k >= m) continue;
        if (i == 0 || key[i - 1] != k) first[k] = i;
        if (i == n - 1 || key[i + 1] != k) last[k] = i + 1;
    }
}

// Destination row blockIdx.x; each thread holds APPLY_COLS columns, strided by the
// gridDim.y * blockDim.x column threads: dst[d] (f32) += sum over its sources
// (order[first[d]..last[d]], increasing source index) of w[r] * src[r], in that order. Sources
// go in batches of APPLY_BATCH whose loads are all issued before the in-order adds, so a
// destination with many sources (a frequent token's embedding row) is not one load latency
// per source.
#define APPLY_COLS 8
#define APPLY_BATCH 4
extern "C" __global__ void index_add_apply(const void* src, int st_, const float* w,
                                           const int* __restrict__ order,
                                           const int* __restrict__ first,
                                           const int* __restrict__ last, float* dst, size_t row) {
    const size_t d = blockIdx.x;
    const int o = first[d], c = last[d] - o;
    if (c <= 0) return;
    const size_t step = (size_t)gridDim.y * blockDim.x;
    for (size_t j0 = blockIdx.y * (size_t)blockDim.x + threadIdx.x; j0 < row;
         j0 += step * APPLY_COLS) {
        float acc[APPLY_COLS];
#pragma unroll
        for (int u = 0; u < APPLY_COLS; u++) {
            const size_t j = j0 + u * step;
            acc[u] = j < row ? dst[d * row + j] : 0.f;
        }
        int i = 0;
        for (; i + APPLY_BATCH <= c; i += APPLY_BATCH) {
            size_t base[APPLY_BATCH];
            float wr[APPLY_BATCH], v[APPLY_BATCH][APPLY_COLS];
#pragma unroll
            for (int q = 0; q < APPLY_BATCH; q++) {
                const int r = order[o + i + q];
                base[q] = (size_t)r * row;
                wr[q] = w ? w[r] : 1.f;
            }
#pragma unroll
            for (int q = 0; q < APPLY_BATCH; q++)
#pragma unroll
                for (int u = 0; u < APPLY_COLS; u++) {
                    const size_t j = j0 + u * step;
                    v[q][u] = j < row ? ld(src, st_, base[q] + j) : 0.f;
                }
#pragma unroll
            for (int q = 0; q < APPLY_BATCH; q++)
#pragma unroll
                for (int u = 0; u < APPLY_COLS; u++)
                    acc[u] = __fadd_rn(acc[u], w ? __fmul_rn(wr[q], v[q][u]) : v[q][u]);
        }
        for (; i < c; i++) {
            const int r = order[o + i];
            const float wr = w ? w[r] : 1.f;
#pragma unroll
            for (int u = 0; u < APPLY_COLS; u++) {
                const size_t j = j0 + u * step;
                if (j < row) {
                    const float v = ld(src, st_, (size_t)r * row + j);
                    acc[u] = __fadd_rn(acc[u], w ? __fmul_rn(wr, v) : v);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < APPLY_COLS; u++) {
            const size_t j = j0 + u * step;
            if (j < row) dst[d * row + j] = acc[u];
        }
    }
}

// The SwiGLU formulas of the SwiGLU kernels (binary_f's swiglu computes the same expression,
// so the same bits).
__device__ __forceinline__ float swiglu_f(float g, float u) { return g * sigmoid_(g) * u; }
__device__ __forceinline__ void swiglu_bwd_f(float gv, float uv, float d, float* dg, float* du) {
    const float s = sigmoid_(gv);
    *dg = d * uv * (s * (1.f + gv * (1.f - s)));
    *du = d * (gv * s);
}

// 8 elements from i (i % 8 == 0, 16-byte aligned base), f32 or bf16.
__device__ __forceinline__ void ld8(const void* p, int dt, size_t i, float* v) {
    if (dt == 1) {
        const uint4 w = *(const uint4*)((const __nv_bfloat16*)p + i);
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

__device__ __forceinline__ unsigned bf_bits(float v) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16(v));
}

// 8 elements to i (as `st` rounds: f32, or bf16 by __float2bfloat16).
__device__ __forceinline__ void st8(void* p, int dt, size_t i, const float* v) {
    if (dt == 1) {
        uint4 w;
        w.x = bf_bits(v[0]) | (bf_bits(v[1]) << 16);
        w.y = bf_bits(v[2]) | (bf_bits(v[3]) << 16);
        w.z = bf_bits(v[4]) | (bf_bits(v[5]) << 16);
        w.w = bf_bits(v[6]) | (bf_bits(v[7]) << 16);
        *(uint4*)((__nv_bfloat16*)p + i) = w;
    } else {
        *(float4*)((float*)p + i) = make_float4(v[0], v[1], v[2], v[3]);
        *(float4*)((float*)p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// SwiGLU backward: d_gate = dy * up * silu'(gate), d_up = dy * silu(gate) (f32 math,
// stored as type `ot`: f32, or bf16 rounded as the cast kernel rounds). With `vec` (n % 8 == 0,
// 16-byte aligned tensors) 8 consecutive elements per thread step.
extern "C" __global__ void swiglu_bwd(const void* g, int gt, const void* u, int ut, const void* dy,
                                      int dt, void* dg, void* du, int ot, size_t n, int vec) {
    if (vec) {
        GRID_STRIDE(c, n >> 3) {
            const size_t i = c << 3;
            float gv[8], uv[8], d[8], a[8], b[8];
            ld8(g, gt, i, gv);
            ld8(u, ut, i, uv);
            ld8(dy, dt, i, d);
#pragma unroll
            for (int q = 0; q < 8; q++) swiglu_bwd_f(gv[q], uv[q], d[q], &a[q], &b[q]);
            st8(dg, ot, i, a);
            st8(du, ot, i, b);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        float a, b;
        swiglu_bwd_f(ld(g, gt, i), ld(u, ut, i), ld(dy, dt, i), &a, &b);
        st(dg, ot, i, a);
        st(du, ot, i, b);
    }
}

// SwiGLU of gate||up rows (one GEMM against a fused [2f, h] weight): y[r, j] =
// silu(gu[r, j]) * gu[r, f + j], n = rows * f outputs. With `vec` (f % 8 == 0, 16-byte
// aligned bases) each thread takes 8 consecutive outputs of a row per step (16-byte bf16
// loads / stores), else one.
extern "C" __global__ void swiglu_gate_up(const void* gu, int gt, void* y, int yt, size_t f, size_t n,
                                          int vec) {
    if (vec) {
        const size_t f8 = f >> 3;
        GRID_STRIDE(c, n >> 3) {
            const size_t r = c / f8, j = (c - r * f8) << 3;
            const size_t gi = r * 2 * f + j;
            float g[8], u[8], o[8];
            ld8(gu, gt, gi, g);
            ld8(gu, gt, gi + f, u);
#pragma unroll
            for (int q = 0; q < 8; q++) o[q] = swiglu_f(g[q], u[q]);
            st8(y, yt, c << 3, o);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        const size_t gi = (i / f) * 2 * f + i % f;
        st(y, yt, i, swiglu_f(ld(gu, gt, gi), ld(gu, gt, gi + f)));
    }
}

// Its backward: d_gu[r, j] = dy * up * silu'(gate), d_gu[r, f + j] = dy * silu(gate) (the
// formulas of swiglu_bwd), stored as type `ot` (f32, or bf16 rounded as the cast kernel
// rounds); `vec` as in swiglu_gate_up.
extern "C" __global__ void swiglu_gate_up_bwd(const void* gu, int gt, const void* dy, int dt,
                                              void* d_gu, int ot, size_t f, size_t n, int vec) {
    if (vec) {
        const size_t f8 = f >> 3;
        GRID_STRIDE(c, n >> 3) {
            const size_t r = c / f8, j = (c - r * f8) << 3;
            const size_t gi = r * 2 * f + j;
            float g[8], u[8], d[8], dg[8], du[8];
            ld8(gu, gt, gi, g);
            ld8(gu, gt, gi + f, u);
            ld8(dy, dt, c << 3, d);
#pragma unroll
            for (int q = 0; q < 8; q++) swiglu_bwd_f(g[q], u[q], d[q], &dg[q], &du[q]);
            st8(d_gu, ot, gi, dg);
            st8(d_gu, ot, gi + f, du);
        }
        return;
    }
    GRID_STRIDE(i, n) {
        const size_t gi = (i / f) * 2 * f + i % f;
        float dg, du;
        swiglu_bwd_f(ld(gu, gt, gi), ld(gu, gt, gi + f), ld(dy, dt, i), &dg, &du);
        st(d_gu, ot, gi, dg);
        st(d_gu, ot, gi + f, du);
    }
}

// Whole-tensor sums, pass 1: partial[block] = sum over a fixed grid-stride slice of x (or
// of x^2 when `squares`), f64. Pass 2 (`reduce_partials`) adds the blocks in order.
extern "C" __global__ void sum_all_partial(const void* x, int xt, size_t n, int squares,
                                           double* partial) {
    double s = 0.0;
    GRID_STRIDE(i, n) {
        double v = ld(x, xt, i);
        s += squares ? v * v : v;
    }
    s = block_sum_d(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] = f(sum of partial[0..blocks]): op 0 sum, 1 mean over n, 2 sqrt.
extern "C" __global__ void reduce_partials(const double* partial, int blocks, int op, size_t n,
                                           float* out) {
    if (threadIdx.x != 0) return;
    double s = 0.0;
    for (int b = 0; b < blocks; b++) s += partial[b];
    out[0] = (float)(op == 1 ? s / (double)n : op == 2 ? sqrt(s) : s);
}
