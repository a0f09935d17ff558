
// ---- the fused router (router.rs): one thread per token ------------------------------
// Appended to routing.cu (same module). Semantics: megamoe-tensor's `route_composed`, the
// composition of the softmax / sigmoid, bias, group-limited mask, top-k, gather, mask,
// normalize and scale kernels; each step here uses the formula of the kernel it replaces
// (f64 softmax sums, f64 group scores and gate sums, top-k order "descending, NaN first,
// ties -> lower index"), in one fixed sequential order per token: bitwise reproducible.

#define ROUTE_MAX_POOL 256
#define ROUTE_MAX_K 64

__device__ __forceinline__ float route_sigmoid(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x);
    return e / (1.f + e);
}

// true if (va, ia) comes before (vb, ib) in top-k order.
__device__ __forceinline__ bool route_before(float va, int ia, float vb, int ib) {
    bool na = va != va, nb = vb != vb;
    if (na != nb) return na;
    if (!na && va != vb) return va > vb;
    return ia < ib;
}

// z [rows, ep] pool logits (f32), bias [e] or null. score_fn: 0 softmax over the pool,
// 1 sigmoid, 2 the logits (softmax over the k chosen). n_groups > 0: group-limited mask
// (m best groups). Writes slots/gates/g_raw [rows, k], g_masked [rows, k] (if non-null),
// probs [rows, ep] = softmax(z) and lse [rows] = logsumexp(z).
extern "C" __global__ void route_tokens(const float* __restrict__ z, const float* __restrict__ bias,
                                        int rows, int ep, int e, int k, int score_fn, int n_groups,
                                        int m, float eps, float scale, int* __restrict__ slots,
                                        float* __restrict__ gates, float* __restrict__ g_raw,
                                        float* __restrict__ g_masked, float* __restrict__ probs,
                                        float* __restrict__ lse) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* zr = z + (size_t)r * ep;
    // softmax statistics over the pool (softmax_rows / reduce_rows' logsumexp)
    float mx = NEG_INF;
    for (int j = 0; j < ep; j++) mx = fmaxf(mx, zr[j]);
    double s = 0.0;
    for (int j = 0; j < ep; j++) s += exp((double)(zr[j] - mx));
    const double inv = 1.0 / s;
    lse[r] = mx == NEG_INF ? NEG_INF : (float)((double)mx + log(s));
    // scores and selection values
    float sel[ROUTE_MAX_POOL];
    for (int j = 0; j < ep; j++) {
        float p = (float)(exp((double)(zr[j] - mx)) * inv);
        probs[(size_t)r * ep + j] = p;
        float sc = score_fn == 0 ? p : score_fn == 1 ? route_sigmoid(zr[j]) : zr[j];
        sel[j] = bias ? sc + (j < e ? bias[j] : 0.f) : sc;
    }
    // group-limited mask (group_limited_mask)
    if (n_groups > 0) {
        const int per = ep / n_groups;
        unsigned long long kept[4] = {0ull, 0ull, 0ull, 0ull};
        for (int pick = 0; pick < m; pick++) {
            double best = 0.0;
            int bi = -1;
            for (int gi = 0; gi < n_groups; gi++) {
                if ((kept[gi >> 6] >> (gi & 63)) & 1ull) continue;
                float a = NEG_INF, b = NEG_INF;
                for (int j = 0; j < per; j++) {
                    float v = sel[gi * per + j];
                    if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
                }
                double gs = per >= 2 ? (double)a + (double)b : (double)a;
                if (bi < 0 || gs > best) { best = gs; bi = gi; }
            }
            kept[bi >> 6] |= 1ull << (bi & 63);
        }
        for (int j = 0; j < ep; j++) {
            int gi = j / per;
            if (!((kept[gi >> 6] >> (gi & 63)) & 1ull)) sel[j] = NEG_INF;
        }
    }
    // top-k (topk_rows): pass t takes the best element after pick t-1 in top-k order
    int idx[ROUTE_MAX_K];
    float pv = 0.f;
    int pi = -1;
    for (int t = 0; t < k; t++) {
        float bv = 0.f;
        int bi = -1;
        for (int j = 0; j < ep; j++) {
            float v = sel[j];
            if (pi >= 0 && !route_before(pv, pi, v, j)) continue;
            if (bi < 0 || route_before(v, j, bv, bi)) { bv = v; bi = j; }
        }
        idx[t] = bi;
        pv = bv;
        pi = bi;
    }
    // raw gates of the chosen slots
    float g[ROUTE_MAX_K];
    if (score_fn == 2) { // softmax of the chosen logits (softmax_rows over k)
        float cm = NEG_INF;
        for (int t = 0; t < k; t++) cm = fmaxf(cm, zr[idx[t]]);
        double cs = 0.0;
        for (int t = 0; t < k; t++) cs += exp((double)(zr[idx[t]] - cm));
        const double cinv = 1.0 / cs;
        for (int t = 0; t < k; t++) g[t] = (float)(exp((double)(zr[idx[t]] - cm)) * cinv);
    } else {
        for (int t = 0; t < k; t++) {
            float zv = zr[idx[t]];
            g[t] = score_fn == 1 ? route_sigmoid(zv) : (float)(exp((double)(zv - mx)) * inv);
        }
    }
    // null slots get 0 (real_slot_mask, mul), normalize (normalize_rows), scale
    double gs = 0.0;
    for (int t = 0; t < k; t++) {
        const size_t q = (size_t)r * k + t;
        slots[q] = idx[t];
        g_raw[q] = g[t];
        if (ep > e) g[t] = g[t] * (idx[t] < e ? 1.f : 0.f);
        if (g_masked) g_masked[q] = g[t];
        gs += (double)g[t];
    }
    const float den = (float)(gs + (double)eps);
    for (int t = 0; t < k; t++) {
        float gn = g_masked ? g[t] / den : g[t];
        gates[(size_t)r * k + t] = gn * scale;
    }
}

// One token's gradient through the gates (route_tokens_bwd below) into dz [ep].
__device__ void route_bwd_row(const float* __restrict__ d_gates, const int* __restrict__ slots,
                              const float* __restrict__ g_raw,
                              const float* __restrict__ g_masked, const float* __restrict__ p,
                              size_t rk, int ep, int e, int k, int score_fn, float eps,
                              float scale, float* __restrict__ dz) {
    int idx[ROUTE_MAX_K];
    float d[ROUTE_MAX_K];
    for (int t = 0; t < k; t++) {
        idx[t] = slots[rk + t];
        d[t] = __fadd_rn(__fmul_rn(d_gates[rk + t], scale), 0.f);
    }
    if (score_fn != 1 && g_masked) {
        // softmax scores renormalised among the real picks, in closed form
        // (router.rs softmax_normalized_backward)
        double gs = 0.0;
        for (int t = 0; t < k; t++) gs += (double)g_masked[rk + t];
        const float den = (float)(gs + (double)eps);
        double cs = 0.0;
        float g[ROUTE_MAX_K];
        for (int t = 0; t < k; t++) {
            g[t] = g_masked[rk + t] / den;
            d[t] = __fmul_rn(g[t], d[t]); // gd
            cs += (double)d[t];
        }
        const float cross = (float)cs;
        // eps_share = ((Σ g_masked) + eps)^-1 · eps · cross, each step an f32 op
        const float share =
            __fmul_rn(__fadd_rn(__fmul_rn(1.f / __fadd_rn((float)gs, eps), eps), 0.f), cross);
        if (score_fn == 0) {
            for (int j = 0; j < ep; j++) dz[j] = __fsub_rn(0.f, __fmul_rn(p[j], share));
            for (int t = 0; t < k; t++) {
                const int j = idx[t];
                dz[j] = __fsub_rn(__fsub_rn(d[t], __fmul_rn(g[t], cross)), __fmul_rn(p[j], share));
            }
        } else {
            for (int j = 0; j < ep; j++) dz[j] = 0.f;
            for (int t = 0; t < k; t++)
                dz[idx[t]] = __fsub_rn(__fsub_rn(d[t], __fmul_rn(g[t], cross)),
                                       __fmul_rn(g_raw[rk + t], share));
        }
        return;
    }
    if (g_masked) { // normalize_rows_bwd
        double s = 0.0;
        for (int t = 0; t < k; t++) s += (double)g_masked[rk + t];
        s += (double)eps;
        double dot = 0.0;
        for (int t = 0; t < k; t++) dot += ((double)g_masked[rk + t] / s) * (double)d[t];
        for (int t = 0; t < k; t++) d[t] = (float)(((double)d[t] - dot) / s);
    }
    if (ep > e)
        for (int t = 0; t < k; t++) d[t] = __fmul_rn(d[t], idx[t] < e ? 1.f : 0.f);
    if (score_fn == 1) { // sigmoid_backward: dy * y * (1 - y), scattered
        for (int j = 0; j < ep; j++) dz[j] = 0.f;
        for (int t = 0; t < k; t++) {
            const float y = g_raw[rk + t];
            dz[idx[t]] = __fmul_rn(__fmul_rn(d[t], y), __fsub_rn(1.f, y));
        }
    } else if (score_fn == 0) { // softmax_rows_bwd over the pool of the scattered d
        double dot = 0.0;
        for (int t = 0; t < k; t++) dot += (double)p[idx[t]] * (double)d[t];
        for (int j = 0; j < ep; j++) dz[j] = (float)((double)p[j] * (0.0 - dot));
        for (int t = 0; t < k; t++) {
            const int j = idx[t];
            dz[j] = (float)((double)p[j] * ((double)d[t] - dot));
        }
    } else { // softmax_rows_bwd over the k chosen, scattered
        double dot = 0.0;
        for (int t = 0; t < k; t++) dot += (double)g_raw[rk + t] * (double)d[t];
        for (int j = 0; j < ep; j++) dz[j] = 0.f;
        for (int t = 0; t < k; t++)
            dz[idx[t]] = (float)((double)g_raw[rk + t] * ((double)d[t] - dot));
    }
}

// Backward of route_tokens with the choice held fixed: d_gates [rows, k] -> d_z [rows, ep]
// (written fresh). probs [rows, ep] (softmax of z), g_raw / g_masked [rows, k] as saved by
// the forward (g_masked non-null iff renormalised). Then, in this order, the router losses'
// terms when given: + softmax_backward(p, coeff · aux_scale) (coeff [rows, ep]: the aux
// loss's ∂aux/∂p) and + p · (lse · z_scale) (lse [rows]: the z-loss). Semantics:
// megamoe-tensor's `route_backward_composed`; the products and sums are the composed
// kernels' (f32 products and sums rounded as separate ops, f64 sums in token order).
extern "C" __global__ void route_tokens_bwd(const float* __restrict__ d_gates,
                                            const int* __restrict__ slots,
                                            const float* __restrict__ g_raw,
                                            const float* __restrict__ g_masked,
                                            const float* __restrict__ probs, int rows, int ep,
                                            int e, int k, int score_fn, float eps, float scale,
                                            const float* __restrict__ coeff, float aux_scale,
                                            const float* __restrict__ lse, float z_scale,
                                            float* __restrict__ d_z, int* err) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* p = probs + (size_t)r * ep;
    float* dz = d_z + (size_t)r * ep;
    for (int t = 0; t < k; t++) { // a slot outside the pool: reported (code 13), row zeroed
        const int sl = slots[(size_t)r * k + t];
        if (sl < 0 || sl >= ep) {
            report(err, 13, sl, (long long)r * k + t, ep);
            for (int j = 0; j < ep; j++) dz[j] = 0.f;
            return;
        }
    }
    route_bwd_row(d_gates, slots, g_raw, g_masked, p, (size_t)r * k, ep, e, k, score_fn, eps,
                  scale, dz);
    if (coeff) { // softmax_rows_bwd of the scaled coefficients, then add
        const float* c = coeff + (size_t)r * ep;
        double dot = 0.0;
        for (int j = 0; j < ep; j++)
            dot += (double)p[j] * (double)__fadd_rn(__fmul_rn(c[j], aux_scale), 0.f);
        for (int j = 0; j < ep; j++) {
            const double cj = (double)__fadd_rn(__fmul_rn(c[j], aux_scale), 0.f);
            dz[j] = __fadd_rn(dz[j], (float)((double)p[j] * (cj - dot)));
        }
    }
    if (lse) { // p · (lse · z_scale), then add
        const float w = __fadd_rn(__fmul_rn(lse[r], z_scale), 0.f);
        for (int j = 0; j < ep; j++) dz[j] = __fadd_rn(dz[j], __fmul_rn(p[j], w));
    }
}
