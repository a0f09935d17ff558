//! CPU GEMM kernels on top of the `gemm` crate (chosen by the benchmark in
//! `benches/gemm.rs`, numbers in docs/perf.md).
//!
//! `gemm` parallelises over output blocks only and walks the reduction dimension in a fixed
//! order whose blocking depends on (m, n, k) alone, so its results are identical for every
//! thread count (checked by `matmul_same_bits_for_1_and_3_threads`). Grouped GEMMs cut their
//! work into (group, row block) pieces of fixed size and run the pieces in parallel with
//! single-threaded GEMMs, which balances ragged groups without any shape-dependent tuning.

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

/// Rows of the left operand per parallel piece in grouped/batched GEMMs. 128 keeps the rhs
/// packing cost (N·K per piece) below 1 % of the piece's 128·N·K multiply-adds.
pub(crate) const ROWS_PER_PIECE: usize = 128;

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

/// Grouped GEMM over ragged row groups: rows `offsets[g]..offsets[g+1]` of `x [R, k]` times
/// weight `w_g` (`[n, k]` if `trans_w`, else `[k, n]`) give the same rows of the `[R, n]`
/// output.
pub(crate) fn grouped(
    x: &[f32],
    group_sizes: &[usize],
    w: &[f32],
    trans_w: bool,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let rows: usize = group_sizes.iter().sum();
    let mut out = vec![0.0f32; rows * n];
    if n == 0 {
        return out;
    }
    // Fixed pieces: (group, row block of ≤ ROWS_PER_PIECE rows).
    let mut pieces = Vec::new();
    let mut lens = Vec::new();
    let mut row = 0;
    for (g, &size) in group_sizes.iter().enumerate() {
        let mut r = 0;
        while r < size {
            let len = (size - r).min(ROWS_PER_PIECE);
            pieces.push((g, row + r, len));
            lens.push(len * n);
            r += len;
        }
        row += size;
    }
    let outs = super::split_mut(&mut out, &lens);
    pieces
        .into_par_iter()
        .zip(outs)
        .for_each(|((g, r0, len), c)| {
            let a = Operand {
                data: &x[r0 * k..(r0 + len) * k],
                trans: false,
            };
            let b = Operand {
                data: &w[g * n * k..(g + 1) * n * k],
                trans: trans_w,
            };
            gemm_into(c, len, n, k, a, b, None, false);
        });
    out
}

/// Weight gradient of the grouped GEMM: `dw[g] = dy_gᵀ · x_g` (`[n, k]`) for the row group
/// `g` of `dy [R, n]` and `x [R, k]`; empty groups give zeros. Pieces are (group, block of
/// ≤ ROWS_PER_PIECE rows of dw_g), so the sum over the group's rows is never split.
pub(crate) fn grouped_wgrad(
    dy: &[f32],
    x: &[f32],
    group_sizes: &[usize],
    n: usize,
    k: usize,
) -> Vec<f32> {
    let groups = group_sizes.len();
    let mut out = vec![0.0f32; groups * n * k];
    if n == 0 || k == 0 {
        return out;
    }
    let mut pieces = Vec::new();
    let mut lens = Vec::new();
    let mut row = 0;
    for &size in group_sizes {
        let mut j = 0;
        while j < n {
            let len = (n - j).min(ROWS_PER_PIECE);
            pieces.push((row, size, j, len));
            lens.push(len * k);
            j += len;
        }
        row += size;
    }
    let outs = super::split_mut(&mut out, &lens);
    pieces
        .into_par_iter()
        .zip(outs)
        .for_each(|((r0, size, j0, len), c)| {
            if size == 0 {
                return; // empty group: dw_g stays zero
            }
            // dy_g[:, j0..j0+len]ᵀ is [len, size]: stored dy_g is [size, n] row-major, so the
            // logical matrix (rows j, cols r) sits at r*n + j: row stride 1, col stride n.
            let dyt = &dy[r0 * n + j0..];
            let xs = &x[r0 * k..(r0 + size) * k];
            gemm_strided(c, len, k, size, dyt, 1, n as isize, xs, k as isize, 1);
        });
    out
}

/// `c[m, n] = a · b` with explicit strides (a: m×kk, b: kk×n), single-threaded.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    c: &mut [f32],
    m: usize,
    n: usize,
    kk: usize,
    a: &[f32],
    a_rs: isize,
    a_cs: isize,
    b: &[f32],
    b_rs: isize,
    b_cs: isize,
) {
    debug_assert!(c.len() >= m * n);
    // SAFETY: callers pass `a` starting at the logical element (0,0) with every element
    // (i, l), i < m, l < kk at offset i*a_rs + l*a_cs inside the slice, likewise for b
    // (grouped_wgrad: offsets ≤ (size-1)*n + len-1 within dy[r0*n + j0..]); `c` holds m·n
    // elements and aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}
