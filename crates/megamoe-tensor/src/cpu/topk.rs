//! CPU top-k over the last dimension.
//!
//! Order: descending value; equal values (including +0.0 and −0.0) keep the lower index
//! first; NaN counts as larger than every number (as in PyTorch) and NaNs tie among
//! themselves, so the order is total and the result unique.

use std::cmp::Ordering;

use rayon::prelude::*;

use super::rows_per_task;

/// True if `(va, ia)` comes before `(vb, ib)` in top-k order.
#[inline]
fn before(va: f32, ia: usize, vb: f32, ib: usize) -> Ordering {
    let by_value = match (va.is_nan(), vb.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        // Descending: larger value first. partial_cmp is total on non-NaN (−0 == +0).
        (false, false) => vb.partial_cmp(&va).unwrap_or(Ordering::Equal),
    };
    by_value.then(ia.cmp(&ib))
}

/// Top-`k` of each row of `x [rows, len]`: values `[rows, k]` and indices `[rows, k]`.
pub(crate) fn topk(x: &[f32], len: usize, k: usize) -> (Vec<f32>, Vec<i32>) {
    let rows = x.len().checked_div(len).unwrap_or(0);
    let mut vals = vec![0.0f32; rows * k];
    let mut idxs = vec![0i32; rows * k];
    if k == 0 || rows == 0 {
        return (vals, idxs);
    }
    let per = rows_per_task(len);
    vals.par_chunks_mut(per * k)
        .zip(idxs.par_chunks_mut(per * k))
        .enumerate()
        .for_each(|(c, (vo, io))| {
            let mut order: Vec<usize> = Vec::with_capacity(len);
            for (i, (vr, ir)) in vo.chunks_mut(k).zip(io.chunks_mut(k)).enumerate() {
                let r = c * per + i;
                let xr = &x[r * len..(r + 1) * len];
                order.clear();
                order.extend(0..len);
                let cmp = |&a: &usize, &b: &usize| before(xr[a], a, xr[b], b);
                if k < len {
                    order.select_nth_unstable_by(k - 1, cmp);
                }
                order[..k].sort_unstable_by(cmp);
                for (j, &e) in order[..k].iter().enumerate() {
                    vr[j] = xr[e];
                    ir[j] = e as i32;
                }
            }
        });
    (vals, idxs)
}
