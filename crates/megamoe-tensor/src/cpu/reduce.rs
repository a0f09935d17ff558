//! CPU reductions. Sums accumulate in f64 in a fixed order: within a fixed-size piece
//! sequentially, then the pieces' partials in piece order. Piece sizes depend on shapes
//! only, so the bits do not depend on the thread count.

use rayon::prelude::*;

use super::{par_rows, ELEMS_PER_TASK};

/// Σ f(x_i) over all elements, in f64.
pub(crate) fn sum_all(x: &[f32], f: impl Fn(f32) -> f64 + Sync + Send) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(ELEMS_PER_TASK)
        .map(|c| c.iter().map(|&v| f(v)).sum::<f64>())
        .collect();
    partials.iter().sum()
}

/// √(Σ x²) of each row of `x [rows, len]`, summed exactly as [`sum_all`] sums one row.
pub(crate) fn norm_rows(x: &[f32], len: usize, rows: usize) -> Vec<f32> {
    (0..rows)
        .map(|r| {
            let s = sum_all(&x[r * len..(r + 1) * len], |v| (v as f64) * (v as f64));
            s.sqrt() as f32
        })
        .collect()
}

/// Per-row reduction of `x [rows, len]` to `[rows]`.
pub(crate) fn rows_reduce(
    x: &[f32],
    len: usize,
    rows: usize,
    f: impl Fn(&[f32]) -> f32 + Sync + Send,
) -> Vec<f32> {
    if len == 0 {
        return (0..rows).map(|_| f(&[])).collect();
    }
    par_rows(x, len, 1, rows, |_, xr, o| o[0] = f(xr))
}

/// Rows per piece of a column sum: the partial sums of a piece are one `[len]` f64 vector.
const ROWS_PER_PIECE: usize = 256;

/// Σ over rows of `x [rows, len]` → `[len]` (f64 accumulation).
pub(crate) fn sum_rows(x: &[f32], len: usize, rows: usize) -> Vec<f32> {
    sum_rows_f64(x, len, rows)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// Σ over rows in f64, the partial form shared with the norm weight gradients.
pub(crate) fn sum_rows_f64(x: &[f32], len: usize, rows: usize) -> Vec<f64> {
    sum_rows_with(len, rows, |r, acc| {
        for (a, &v) in acc.iter_mut().zip(&x[r * len..(r + 1) * len]) {
            *a += v as f64;
        }
    })
}

/// Generic column sum: `add_row(r, acc)` adds row `r`'s contribution into `acc [len]`.
pub(crate) fn sum_rows_with(
    len: usize,
    rows: usize,
    add_row: impl Fn(usize, &mut [f64]) + Sync + Send,
) -> Vec<f64> {
    let pieces = rows.div_ceil(ROWS_PER_PIECE);
    let partials: Vec<Vec<f64>> = (0..pieces)
        .into_par_iter()
        .map(|p| {
            let mut acc = vec![0.0f64; len];
            for r in p * ROWS_PER_PIECE..((p + 1) * ROWS_PER_PIECE).min(rows) {
                add_row(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; len];
    for p in &partials {
        for (t, &v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}
