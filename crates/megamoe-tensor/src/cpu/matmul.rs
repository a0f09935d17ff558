//! CPU GEMM kernels on top of the `gemm` crate (chosen by the benchmark in
//! `benches/gemm.rs`, numbers in docs/perf.md).
//!
//! `gemm` parallelises over output blocks only and walks the reduction dimension in a fixed
//! order whose blocking depends on (m, n, k) alone, so its results are identical for every
//! thread count (checked by `matmul_family_same_bits_for_1_and_3_threads`), so we are free
//! to choose where threads go: grouped GEMMs run one GEMM per group on its contiguous row
//! block, big groups with threads inside the GEMM, small groups in parallel across groups.

use gemm::Parallelism;
use rayon::prelude::*;

/// A row-major matrix operand with an optional transpose: `data` holds the stored matrix,
/// which is `[rows, cols]` of the logical operand, or `[cols, rows]` if `trans`.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub data: &'a [f32],
    pub trans: bool,
}

impl Operand<'_> {
    /// (row stride, column stride) of the logical matrix `[rows, cols]`.
    fn strides(&self, rows: usize, cols: usize) -> (isize, isize) {
        if self.trans {
            let _ = cols;
            (1, rows as isize)
        } else {
            let _ = rows;
            (cols as isize, 1)
        }
    }
}

/// Below this many multiply-adds a GEMM runs single-threaded: thread start-up would cost
/// more than the work.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// Batched GEMMs with at least this many matrices run one single-threaded GEMM per task.
const BATCH_PARALLEL_MIN: usize = 4;

/// `c[m, n] = beta·c + a[m, k] · b[k, n]` (`beta = None` overwrites `c` without reading it).
/// `c` is row-major with row stride `n`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    beta: Option<f32>,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(c.len() >= m * n);
    if k == 0 {
        match beta {
            None => c[..m * n].iter_mut().for_each(|v| *v = 0.0),
            Some(b) => c[..m * n].iter_mut().for_each(|v| *v *= b),
        }
        return;
    }
    let (a_rs, a_cs) = a.strides(m, k);
    let (b_rs, b_cs) = b.strides(k, n);
    let parallelism = if threads && m * n * k >= PARALLEL_MIN_FLOPS {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    let (read_dst, alpha) = match beta {
        None => (false, 0.0),
        Some(b) => (true, b),
    };
    // SAFETY: the pointers cover the logical matrices: `a.data` holds m·k elements, `b.data`
    // k·n and `c` at least m·n (checked by the callers in ops/matmul.rs and by the debug
    // assertion above); strides above address exactly those row-major buffers. `c` does not
    // alias `a` or `b` (it is a distinct `&mut`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            alpha,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `[batch, m, n]` = per-batch `a_b · b_b`; `a` holds `batch` matrices of m·k elements,
/// `b` batch matrices of k·n elements (or one shared matrix if `b_shared`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bmm(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    b_shared: bool,
) -> Vec<f32> {
    let mut out = vec![0.0f32; batch * m * n];
    if m * n == 0 {
        return out;
    }
    let one = |i: usize, c: &mut [f32], threads: bool| {
        let ai = Operand {
            data: &a.data[i * m * k..(i + 1) * m * k],
            trans: a.trans,
        };
        let bi = if b_shared {
            b
        } else {
            Operand {
                data: &b.data[i * k * n..(i + 1) * k * n],
                trans: b.trans,
            }
        };
        gemm_into(c, m, n, k, ai, bi, None, threads);
    };
    // Few large matrices: threads inside each GEMM; many: one GEMM per task. The choice
    // depends on the shape only, and gemm's bits do not depend on its thread count.
    if batch >= BATCH_PARALLEL_MIN {
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, c)| one(i, c, false));
    } else {
        out.chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, c)| one(i, c, true));
    }
    out
}

/// Groups with at least this many rows may run one multi-threaded GEMM each (in group
/// order) when there are too few groups to keep every thread busy; otherwise every group
/// runs as a single-threaded GEMM, groups in parallel. Both paths give the same bits (gemm
/// never splits the reduction), so the choice is free to depend on the thread count.
const BIG_GROUP_ROWS: usize = 256;

/// With at least this many non-empty groups per thread, all groups run single-threaded in
/// parallel across groups: gemm's threading inside one small-M GEMM (a few hundred rows)
/// costs more in synchronisation and duplicated packing than the load imbalance of
/// whole-group tasks, which are handed out largest first.
const GROUPS_PER_THREAD_FOR_ACROSS: usize = 2;

/// Runs `work(g, out_g, threads)` for every non-empty group (`rows[g] > 0`). With enough
/// groups (see [`GROUPS_PER_THREAD_FOR_ACROSS`]) all run in parallel with
/// `threads = false`, largest `cost` first; otherwise big groups run one after another with
/// `threads = true` and the small ones in parallel with `threads = false`.
fn for_each_group(
    parts: Vec<&mut [f32]>,
    rows: &[usize],
    cost: &[usize],
    work: impl Fn(usize, &mut [f32], bool) + Sync + Send,
) {
    let non_empty = rows.iter().filter(|&&r| r > 0).count();
    let across_all = non_empty >= GROUPS_PER_THREAD_FOR_ACROSS * rayon::current_num_threads();
    let mut small = Vec::new();
    for (g, part) in parts.into_iter().enumerate() {
        if rows[g] == 0 {
            continue;
        }
        if !across_all && rows[g] >= BIG_GROUP_ROWS {
            work(g, part, true);
        } else {
            small.push((g, part));
        }
    }
    // Largest first: whole-group tasks balance best when the big ones start early.
    small.sort_by_key(|&(g, _)| std::cmp::Reverse(cost[g]));
    small
        .into_par_iter()
        .with_max_len(1)
        .for_each(|(g, part)| work(g, part, false));
}

/// Splits `out` (rows of `row_len`) into one mutable part per span (`(offset, rows)`, in
/// order and disjoint) and the gaps between and after them.
fn split_spans<'a>(
    out: &'a mut [f32],
    spans: &[(usize, usize)],
    row_len: usize,
) -> (Vec<&'a mut [f32]>, Vec<&'a mut [f32]>) {
    let mut parts = Vec::with_capacity(spans.len());
    let mut gaps = Vec::new();
    let mut rest = out;
    let mut at = 0;
    for &(o, s) in spans {
        let (gap, tail) = rest.split_at_mut((o - at) * row_len);
        let (part, tail) = tail.split_at_mut(s * row_len);
        gaps.push(gap);
        parts.push(part);
        rest = tail;
        at = o + s;
    }
    gaps.push(rest);
    (parts, gaps)
}

/// `beta·c` in place (`None`: zero), for output blocks no product touches.
fn scale_block(c: &mut [f32], beta: Option<f32>) {
    match beta {
        None => c.iter_mut().for_each(|v| *v = 0.0),
        Some(b) if b != 1.0 => c.iter_mut().for_each(|v| *v *= b),
        Some(_) => {}
    }
}

/// In place `out ← beta·out + grouped(x, w)` over `out [R, n]` (`beta = None` overwrites
/// without reading `out`): rows `o..o+s` of `x [R, k]` for span `g = (o, s)` times weight
/// `w_g` (`[n, k]` if `trans_w`, else `[k, n]`) give the same rows of the output; rows in no
/// span get `beta·out` (zero for `None`). One GEMM per group on its contiguous row block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grouped_into(
    out: &mut [f32],
    x: &[f32],
    spans: &[(usize, usize)],
    w: &[f32],
    trans_w: bool,
    n: usize,
    k: usize,
    beta: Option<f32>,
) {
    let sizes: Vec<usize> = spans.iter().map(|&(_, s)| s).collect();
    let (parts, gaps) = split_spans(out, spans, n);
    gaps.into_iter().for_each(|c| scale_block(c, beta));
    for_each_group(parts, &sizes, &sizes, |g, c, threads| {
        let (r0, len) = spans[g];
        let a = Operand {
            data: &x[r0 * k..(r0 + len) * k],
            trans: false,
        };
        let w_g = &w[g * n * k..(g + 1) * n * k];
        if trans_w && transpose_pays(len, n, k) {
            // `x · W_gᵀ` with `W_gᵀ` written out first: gemm then packs it with contiguous
            // copies instead of a strided gather (module `transpose`); same bits.
            with_scratch(n * k, |wt| {
                super::transpose::transpose(w_g, n, k, wt);
                let b = Operand {
                    data: wt,
                    trans: false,
                };
                gemm_into(c, len, n, k, a, b, beta, threads);
            });
        } else {
            let b = Operand {
                data: w_g,
                trans: trans_w,
            };
            gemm_into(c, len, n, k, a, b, beta, threads);
        }
    });
}

/// Whether `[m, k] · W[n, k]ᵀ` should run on an explicit `Wᵀ` (see `grouped_into`).
///
/// The result bits do not change: gemm computes every output element as the same fused
/// multiply-add chain over k (its k-blocking depends on k alone) whatever the operand
/// strides, EXCEPT on its special paths chosen by strides and size: the horizontal
/// kernels (`m·n ≤ 256` with both operands contiguous along k), the vector kernels (`m` or
/// `n` = 1) and `k ≤ 2`. Those shapes keep the stored layout (they are too small for the
/// packing to matter). `grouped_matmul_same_bits_as_dense_matmul_per_group` (tests/
/// matmul.rs) pins this down against `matmul` on the stored layout.
fn transpose_pays(m: usize, n: usize, k: usize) -> bool {
    m > 1 && n > 1 && k > 2 && m * n > 256
}

thread_local! {
    /// Per-thread scratch for transposed weights (grown to the largest weight seen, never
    /// shrunk, so steady-state calls neither allocate nor page-fault).
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on a scratch slice of `len` elements (contents unspecified). The buffer is
/// taken out of the thread-local while `f` runs, so a nested call (gemm's rayon threads
/// may run other tasks while waiting) just allocates its own.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| s.set(buf));
    out
}

/// In place `out[g] ← beta·out[g] + dy_gᵀ · x_g` over `out [G, n, k]` for the row spans
/// `(offset, rows)` of `dy [R, n]` and `x [R, k]`; `beta = None` overwrites without reading
/// `out`. An empty group contributes a zero product: its block is zeroed (`None`) or scaled
/// by `beta`. The sum over the group's rows is the GEMM's reduction dimension, never split.
pub(crate) fn grouped_wgrad_into(
    out: &mut [f32],
    dy: &[f32],
    x: &[f32],
    spans: &[(usize, usize)],
    n: usize,
    k: usize,
    beta: Option<f32>,
) {
    let groups = spans.len();
    let sizes: Vec<usize> = spans.iter().map(|&(_, s)| s).collect();
    let mut parts = super::split_mut(out, &vec![n * k; groups]);
    for (g, part) in parts.iter_mut().enumerate() {
        if sizes[g] == 0 {
            scale_block(part, beta);
        }
    }
    // Every group's product is n·k·size multiply-adds: the group size orders the cost.
    for_each_group(parts, &sizes, &sizes, |g, c, threads| {
        let (r0, size) = spans[g];
        // dy_gᵀ is [n, size]: stored dy_g is [size, n] row-major, i.e. dy_gᵀ transposed.
        let a = Operand {
            data: &dy[r0 * n..(r0 + size) * n],
            trans: true,
        };
        let b = Operand {
            data: &x[r0 * k..(r0 + size) * k],
            trans: false,
        };
        gemm_into(c, n, k, size, a, b, beta, threads);
    });
}
