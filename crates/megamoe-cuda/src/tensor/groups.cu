// Row-group copies around the strided-batched grouped GEMMs (megamoe-tensor's CUDA grouped
// matmuls): packed row groups <-> a padded [g*cap, .] buffer, and zeroing the rows past each
// group's size. Header-free (fast NVRTC compile). One block walks whole rows (grid-stride over
// rows), so no per-element division; copies move `unit`-byte words (16, 4 or 2: the largest
// that divides the row and both addresses). Pure copies, no float math except the
// accumulating unpad (f32 math, bf16 stored round-to-nearest-even): bitwise reproducible.
//
// A group size outside 0..=cap is reported in the engine's error record (code 6, as the
// routing kernels' strided-group check): err[0] = 6, err[1] = size, err[2] = group,
// err[3] = cap.

__device__ void group_report(int* err, int size, int group, int cap) {
    if (err != 0 && atomicCAS(err, 0, 6) == 0) {
        err[1] = size;
        err[2] = group;
        err[3] = cap;
    }
}

// Zeroes one row of `bytes` bytes in `unit`-byte words.
__device__ __forceinline__ void row_zero(char* __restrict__ d, int bytes, int unit) {
    if (unit == 16) {
        uint4* d4 = (uint4*)d;
        for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) d4[i] = make_uint4(0u, 0u, 0u, 0u);
    } else if (unit == 4) {
        for (int i = threadIdx.x; i < bytes / 4; i += blockDim.x) ((unsigned*)d)[i] = 0u;
    } else {
        for (int i = threadIdx.x; i < bytes / 2; i += blockDim.x) ((unsigned short*)d)[i] = 0;
    }
}

// Copies one row of `bytes` bytes in `unit`-byte words.
__device__ __forceinline__ void row_copy(const char* __restrict__ s, char* __restrict__ d,
                                         int bytes, int unit) {
    if (unit == 16) {
        for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x)
            ((uint4*)d)[i] = ((const uint4*)s)[i];
    } else if (unit == 4) {
        for (int i = threadIdx.x; i < bytes / 4; i += blockDim.x)
            ((unsigned*)d)[i] = ((const unsigned*)s)[i];
    } else {
        for (int i = threadIdx.x; i < bytes / 2; i += blockDim.x)
            ((unsigned short*)d)[i] = ((const unsigned short*)s)[i];
    }
}

__device__ __forceinline__ float ld_el(const void* p, int dt, size_t i) {
    if (dt == 1) return __uint_as_float(((unsigned)((const unsigned short*)p)[i]) << 16);
    return ((const float*)p)[i];
}

__device__ __forceinline__ void st_el(void* p, int dt, size_t i, float v) {
    if (dt == 1) {
        unsigned u = __float_as_uint(v);
        unsigned short b = (u & 0x7fffffffu) > 0x7f800000u
                               ? (unsigned short)((u >> 16) | 0x40u)
                               : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        ((unsigned short*)p)[i] = b;
    } else {
        ((float*)p)[i] = v;
    }
}

// dst [g*cap, n] = group gi's sizes[gi] rows of src (packed from offs[gi]), then zero rows;
// src and dst of one type: `unit`-byte words; else converted (f32 <-> bf16, round to
// nearest even: the cast kernel's bits).
extern "C" __global__ void pad_packed(const void* __restrict__ src, int sdt,
                                      void* __restrict__ dst, int ddt, int n, int unit,
                                      const int* __restrict__ sizes, const int* __restrict__ offs,
                                      int g, int cap, int* err) {
    const size_t rows = (size_t)g * cap;
    const int es = sdt == 1 ? 2 : 4, ed = ddt == 1 ? 2 : 4;
    for (size_t p = blockIdx.x; p < rows; p += gridDim.x) {
        int gi = (int)(p / cap), j = (int)(p - (size_t)gi * cap);
        int s = sizes[gi];
        if ((s < 0 || s > cap) && j == 0 && threadIdx.x == 0) group_report(err, s, gi, cap);
        char* d = (char*)dst + p * n * ed;
        if (j >= s) {
            row_zero(d, n * ed, unit);
        } else if (sdt == ddt) {
            row_copy((const char*)src + (size_t)(offs[gi] + j) * n * es, d, n * es, unit);
        } else {
            size_t q = (size_t)(offs[gi] + j) * n;
            for (int c = threadIdx.x; c < n; c += blockDim.x)
                st_el(dst, ddt, p * n + c, ld_el(src, sdt, q + c));
        }
    }
}

// The counted rows of src [g*cap, n] into the packed rows of dst (group gi from offs[gi]):
// a copy when `copy` (same type, beta 0: `unit`-byte words), else
// dst = beta * dst + src in f32 (beta = 0 overwrites without reading dst). Other dst rows
// are untouched.
extern "C" __global__ void unpad_packed(const void* __restrict__ src, int sdt,
                                        void* __restrict__ dst, int ddt, int n, int copy,
                                        int unit, float beta, const int* __restrict__ sizes,
                                        const int* __restrict__ offs, int g, int cap) {
    const size_t rows = (size_t)g * cap;
    const int es = sdt == 1 ? 2 : 4;
    for (size_t p = blockIdx.x; p < rows; p += gridDim.x) {
        int gi = (int)(p / cap), j = (int)(p - (size_t)gi * cap);
        if (j >= sizes[gi]) continue;
        size_t q = (size_t)offs[gi] + j;
        if (copy) {
            row_copy((const char*)src + p * n * es, (char*)dst + q * n * es, n * es, unit);
            continue;
        }
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            float v = ld_el(src, sdt, p * n + c);
            float o = beta == 0.f ? v : __fadd_rn(__fmul_rn(beta, ld_el(dst, ddt, q * n + c)), v);
            st_el(dst, ddt, q * n + c, o);
        }
    }
}

// Rows past each group's size in out [g*stride, row] become 0 (any element type).
extern "C" __global__ void zero_past_sizes(char* __restrict__ out, int bytes, int unit,
                                           const int* __restrict__ sizes, int g, int stride,
                                           int* err) {
    const size_t rows = (size_t)g * stride;
    for (size_t p = blockIdx.x; p < rows; p += gridDim.x) {
        int gi = (int)(p / stride), j = (int)(p - (size_t)gi * stride);
        int s = sizes[gi];
        if ((s < 0 || s > stride) && j == 0 && threadIdx.x == 0) group_report(err, s, gi, stride);
        if (j < s) continue;
        row_zero(out + p * bytes, bytes, unit);
    }
}
