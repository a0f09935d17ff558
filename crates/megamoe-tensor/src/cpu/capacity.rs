//! CPU kernels of the static-capacity expert buffers (`ops/capacity.rs`). Every output has a
//! shape fixed by `(T, k, E, C, d)`; sums run in a fixed order (increasing buffer row per
//! token), so results do not depend on the thread count.

use rayon::prelude::*;

use super::{par_rows, rows_per_task};

/// Static layout of the kept assignments of `idx [t, k]` (`keep [t, k]`): expert `e` owns
/// buffer rows `e·cap .. (e+1)·cap`, filled in (token, slot) order. Returns (`slot_row [t·k]`
/// = buffer row or −1, `row_token [n_real·cap]` = token or −1 for a pad row, `counts
/// [n_real]`), or `Err(e)` naming the first expert that keeps more than `cap`.
#[allow(clippy::type_complexity)]
pub(crate) fn capacity_permutation(
    idx: &[i32],
    k: usize,
    keep: &[f32],
    n_real: usize,
    cap: usize,
) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>), usize> {
    let mut slot_row = vec![-1i32; idx.len()];
    let mut row_token = vec![-1i32; n_real * cap];
    let mut counts = vec![0i32; n_real];
    for (a, &i) in idx.iter().enumerate() {
        let e = i as usize;
        if keep[a] == 0.0 || e >= n_real {
            continue;
        }
        let c = counts[e] as usize;
        if c == cap {
            return Err(e);
        }
        let r = e * cap + c;
        slot_row[a] = r as i32;
        row_token[r] = (a / k) as i32;
        counts[e] += 1;
    }
    Ok((slot_row, row_token, counts))
}

/// `out[r] = x[rows[r]]`, or a zero row where `rows[r] < 0` (indices already validated).
pub(crate) fn gather_rows_or_zero(x: &[f32], row_len: usize, rows: &[i32]) -> Vec<f32> {
    let mut out = vec![0.0f32; rows.len() * row_len];
    if row_len == 0 {
        return out;
    }
    let per = rows_per_task(row_len);
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(c, o)| {
            for (i, orow) in o.chunks_mut(row_len).enumerate() {
                let s = rows[c * per + i];
                if s >= 0 {
                    let s = s as usize;
                    orow.copy_from_slice(&x[s * row_len..(s + 1) * row_len]);
                }
            }
        });
    out
}

/// The kept `(buffer row, assignment)` pairs of token `t`, in increasing buffer row.
fn token_rows(slot_row: &[i32], t: usize, k: usize, pairs: &mut Vec<(usize, usize)>) {
    pairs.clear();
    for j in 0..k {
        let r = slot_row[t * k + j];
        if r >= 0 {
            pairs.push((r as usize, t * k + j));
        }
    }
    pairs.sort_unstable();
}

/// `y[t] = Σ_j w[t·k+j] · rows[slot_row[t·k+j]]` over the kept slots of token `t`, added in
/// increasing buffer row from zero (`w = None`: weight 1, no multiply). `y [t, d]`.
pub(crate) fn combine_slots(
    rows: &[f32],
    d: usize,
    slot_row: &[i32],
    k: usize,
    w: Option<&[f32]>,
) -> Vec<f32> {
    let t = slot_row.len().checked_div(k).unwrap_or(0);
    par_rows(&[], 0, d, t, |tok, _, o| {
        let mut pairs = Vec::with_capacity(k);
        token_rows(slot_row, tok, k, &mut pairs);
        for &(r, a) in &pairs {
            let s = &rows[r * d..(r + 1) * d];
            match w {
                Some(w) => {
                    let wa = w[a];
                    o.iter_mut().zip(s).for_each(|(o, &v)| *o += wa * v);
                }
                None => o.iter_mut().zip(s).for_each(|(o, &v)| *o += v),
            }
        }
    })
}

/// Backward of [`combine_slots`] with weights: `d_rows [b, d]` (`d_rows[r] = w[a]·d_y[t]` for
/// the assignment `a = t·k+j` in row `r`, zero for pad rows) and `d_w [t·k]`
/// (`⟨d_y[t], rows[r]⟩`, products in f32 summed in f64; zero where not kept).
pub(crate) fn combine_slots_backward(
    rows: &[f32],
    d: usize,
    d_y: &[f32],
    slot_row: &[i32],
    k: usize,
    w: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let b = rows.len().checked_div(d).unwrap_or(0);
    let mut row_assignment = vec![usize::MAX; b];
    for (a, &r) in slot_row.iter().enumerate() {
        if r >= 0 {
            row_assignment[r as usize] = a;
        }
    }
    let d_rows = par_rows(&[], 0, d, b, |r, _, o| {
        let a = row_assignment[r];
        if a != usize::MAX {
            let wa = w[a];
            let t = a / k;
            o.iter_mut()
                .zip(&d_y[t * d..(t + 1) * d])
                .for_each(|(o, &g)| *o = g * wa);
        }
    });
    let d_w = slot_row
        .par_iter()
        .enumerate()
        .with_min_len(rows_per_task(d))
        .map(|(a, &r)| {
            if r < 0 {
                return 0.0;
            }
            let (r, t) = (r as usize, a / k);
            d_y[t * d..(t + 1) * d]
                .iter()
                .zip(&rows[r * d..(r + 1) * d])
                .map(|(&g, &v)| (g * v) as f64)
                .sum::<f64>() as f32
        })
        .collect();
    (d_rows, d_w)
}
