//! CPU backend: one file per op family, each holding plain-slice kernels (`&[f32]` in,
//! `Vec<f32>` out), called by the `CpuBackend` kernel-trait impls in `backend/` after the
//! matching `ops/<family>.rs` validated shapes.
//!
//! # Determinism
//! Every kernel gives the same bits for any rayon thread count: work is cut into pieces whose
//! boundaries depend only on the shapes (the constants below), never on
//! `rayon::current_num_threads()`, and every sum runs in a fixed order (sequential inside a
//! piece, pieces combined in index order). GEMMs never split the reduction dimension.
//!
//! # Adding an op family
//! See `ops/mod.rs`.

use rayon::prelude::*;

pub(crate) mod backend;
pub(crate) mod capacity;
pub(crate) mod elementwise;
pub(crate) mod index;
pub(crate) mod loss;
pub(crate) mod mask;
pub(crate) mod matmul;
pub(crate) mod norm;
pub(crate) mod optim;
pub(crate) mod reduce;
pub(crate) mod rng;
pub(crate) mod rope;
pub(crate) mod routing;
pub(crate) mod softmax;
pub(crate) mod topk;
pub(crate) mod transpose;
// New families: append `pub(crate) mod <family>;` here.

/// Elements per parallel task of elementwise kernels. Large enough that task overhead
/// (~1 µs) is small next to 16k element ops, small enough to balance 2..64 threads.
pub(crate) const ELEMS_PER_TASK: usize = 1 << 14;

/// Rows per parallel task for a row kernel with rows of `row_len` elements: about
/// `ELEMS_PER_TASK` elements per task, at least one row. Depends only on the shape.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (ELEMS_PER_TASK / row_len.max(1)).max(1)
}

/// `out[i] = f(&x[i])`, in parallel fixed-size pieces.
pub(crate) fn par_map<T: Sync, U: Send>(x: &[T], f: impl Fn(&T) -> U + Sync + Send) -> Vec<U> {
    x.par_iter().with_min_len(ELEMS_PER_TASK).map(f).collect()
}

/// `out[i] = f(a[i], b[i])`, in parallel fixed-size pieces. Caller checks equal lengths.
pub(crate) fn par_map2(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    a.par_iter()
        .zip(b.par_iter())
        .with_min_len(ELEMS_PER_TASK)
        .map(|(&x, &y)| f(x, y))
        .collect()
}

/// Runs `f(row_index, in_row, out_row)` for every row: `x` is `[rows, in_len]`, the result
/// `[rows, out_len]` (zero-initialised before `f`). Rows are grouped into tasks by
/// [`rows_per_task`].
pub(crate) fn par_rows(
    x: &[f32],
    in_len: usize,
    out_len: usize,
    rows: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * out_len];
    if rows == 0 || out_len == 0 {
        return out;
    }
    let per = rows_per_task(in_len.max(out_len));
    out.par_chunks_mut(per * out_len)
        .enumerate()
        .for_each(|(c, o)| {
            let r0 = c * per;
            for (i, orow) in o.chunks_mut(out_len).enumerate() {
                let r = r0 + i;
                f(r, &x[r * in_len..(r + 1) * in_len], orow);
            }
        });
    out
}

/// Splits `buf` into consecutive mutable pieces of the given lengths (which must sum to at
/// most `buf.len()`).
pub(crate) fn split_mut<'a, T>(mut buf: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(lens.len());
    for &l in lens {
        let (head, tail) = buf.split_at_mut(l);
        parts.push(head);
        buf = tail;
    }
    parts
}
