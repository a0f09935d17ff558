//! CPU gather/scatter and shape kernels. Scatter-adds are deterministic without atomics:
//! each destination row sums its sources in increasing source-row order.

use rayon::prelude::*;

use super::rows_per_task;

/// `out[r] = x[idx[r]]` for rows of `row_len` elements (indices already validated).
pub(crate) fn gather_rows<T: Copy + Send + Sync + Default>(
    x: &[T],
    row_len: usize,
    idx: &[i32],
) -> Vec<T> {
    let mut out = vec![T::default(); idx.len() * row_len];
    if row_len == 0 {
        return out;
    }
    let per = rows_per_task(row_len);
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(c, o)| {
            for (i, orow) in o.chunks_mut(row_len).enumerate() {
                let s = idx[c * per + i] as usize;
                orow.copy_from_slice(&x[s * row_len..(s + 1) * row_len]);
            }
        });
    out
}

/// In place `dst[idx[r]] += w[r] · src[r]` for every source row `r`, each destination
/// summing its sources in increasing `r` (CSR built by a stable counting sort). Rows with
/// no source are not touched.
pub(crate) fn index_add_rows_into(
    dst: &mut [f32],
    row_len: usize,
    idx: &[i32],
    src: &[f32],
    w: Option<&[f32]>,
) {
    let m = dst.len().checked_div(row_len).unwrap_or(0);
    if m == 0 || idx.is_empty() {
        return;
    }
    // CSR: sources of destination d are order[start[d]..start[d+1]], increasing.
    let mut start = vec![0usize; m + 1];
    for &d in idx {
        start[d as usize + 1] += 1;
    }
    for d in 0..m {
        start[d + 1] += start[d];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; idx.len()];
    for (r, &d) in idx.iter().enumerate() {
        order[fill[d as usize]] = r;
        fill[d as usize] += 1;
    }
    let per = rows_per_task(row_len);
    dst.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(c, block)| {
            for (i, o) in block.chunks_mut(row_len).enumerate() {
                let d = c * per + i;
                for &r in &order[start[d]..start[d + 1]] {
                    let s = &src[r * row_len..(r + 1) * row_len];
                    match w {
                        Some(w) => {
                            let wr = w[r];
                            o.iter_mut().zip(s).for_each(|(o, &v)| *o += wr * v);
                        }
                        None => o.iter_mut().zip(s).for_each(|(o, &v)| *o += v),
                    }
                }
            }
        });
}

/// `out[n, j] = x[n, idx[n, j]]` for `x [rows, e]`, `idx [rows, k]`.
pub(crate) fn gather_cols(x: &[f32], e: usize, idx: &[i32], k: usize) -> Vec<f32> {
    let rows = idx.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0.0f32; rows * k];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k)
        .enumerate()
        .with_min_len(rows_per_task(k))
        .for_each(|(n, o)| {
            for (o, &i) in o.iter_mut().zip(&idx[n * k..(n + 1) * k]) {
                *o = x[n * e + i as usize];
            }
        });
    out
}

/// `out [rows, e]` zeros, then `out[n, idx[n, j]] += src[n, j]` in increasing `j`.
pub(crate) fn scatter_cols(src: &[f32], idx: &[i32], k: usize, e: usize) -> Vec<f32> {
    let rows = idx.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0.0f32; rows * e];
    if k == 0 || e == 0 {
        return out;
    }
    out.par_chunks_mut(e)
        .enumerate()
        .with_min_len(rows_per_task(e))
        .for_each(|(n, o)| {
            for j in 0..k {
                o[idx[n * k + j] as usize] += src[n * k + j];
            }
        });
    out
}

/// Copies `x` viewed as `[outer, size, inner]` to `[outer, len, inner]` starting at `start`.
pub(crate) fn narrow<T: Copy + Send + Sync + Default>(
    x: &[T],
    outer: usize,
    size: usize,
    inner: usize,
    start: usize,
    len: usize,
) -> Vec<T> {
    let block = len * inner;
    let mut out = vec![T::default(); outer * block];
    if block == 0 {
        return out;
    }
    out.par_chunks_mut(block)
        .enumerate()
        .with_min_len(rows_per_task(block))
        .for_each(|(o, dst)| {
            let s = o * size * inner + start * inner;
            dst.copy_from_slice(&x[s..s + block]);
        });
    out
}

/// Concatenates pieces viewed as `[outer, size_i, inner]` along the middle dimension.
pub(crate) fn cat<T: Copy + Send + Sync + Default>(
    pieces: &[(&[T], usize)],
    outer: usize,
    inner: usize,
) -> Vec<T> {
    let total: usize = pieces.iter().map(|p| p.1).sum();
    let block = total * inner;
    let mut out = vec![T::default(); outer * block];
    if block == 0 {
        return out;
    }
    out.par_chunks_mut(block)
        .enumerate()
        .with_min_len(rows_per_task(block))
        .for_each(|(o, dst)| {
            let mut at = 0;
            for &(x, size) in pieces {
                let n = size * inner;
                dst[at..at + n].copy_from_slice(&x[o * n..(o + 1) * n]);
                at += n;
            }
        });
    out
}

/// Permutes a row-major tensor of shape `dims` so that output dim `i` is input dim
/// `perm[i]`. Runs of the unchanged trailing dimension are copied as slices.
pub(crate) fn permute<T: Copy + Send + Sync + Default>(
    x: &[T],
    dims: &[usize],
    perm: &[usize],
) -> Vec<T> {
    let rank = dims.len();
    let n: usize = dims.iter().product();
    let mut out = vec![T::default(); n];
    if n == 0 {
        return out;
    }
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    // Keep the innermost run contiguous when the last dim stays last.
    let run = if perm[rank - 1] == rank - 1 {
        dims[rank - 1]
    } else {
        1
    };
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let outer_rank = if run > 1 { rank - 1 } else { rank };
    let per = rows_per_task(run);
    out.par_chunks_mut(per * run)
        .enumerate()
        .for_each(|(c, dst)| {
            for (i, orun) in dst.chunks_mut(run).enumerate() {
                // Decompose the run index over the output dims [0, outer_rank).
                let mut rem = c * per + i;
                let mut src = 0;
                for d in (0..outer_rank).rev() {
                    let sz = out_dims[d];
                    src += (rem % sz) * strides[d];
                    rem /= sz;
                }
                orun.copy_from_slice(&x[src..src + run]);
            }
        });
    out
}
