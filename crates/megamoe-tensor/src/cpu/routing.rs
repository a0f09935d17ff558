//! CPU kernels of the MoE routing family (see `ops/routing.rs` for the contracts).
//!
//! These are the reference semantics of routing: plain loops, narrated. Per-row kernels
//! run in parallel over fixed row pieces; the permutation and capacity kernels are
//! sequential counting sorts over `T·k` integers (cheap next to the expert GEMMs), so their
//! order is fixed by construction and independent of the thread count.

use std::cmp::Ordering;

use rayon::prelude::*;

use super::rows_per_task;

/// Group-limited masking of `sel [rows, e]`: per row, group score = sum of the top
/// `intra` (1 or 2) values of each of the `g` groups; the best `m` groups (ties → lower
/// group) keep their values, every other entry becomes −∞.
pub(crate) fn group_limited_mask(sel: &[f32], e: usize, g: usize, m: usize) -> Vec<f32> {
    let rows = sel.len().checked_div(e).unwrap_or(0);
    let per = e / g;
    let mut out = vec![f32::NEG_INFINITY; rows * e];
    if rows == 0 || e == 0 {
        return out;
    }
    out.par_chunks_mut(e)
        .enumerate()
        .with_min_len(rows_per_task(e))
        .for_each(|(r, o)| {
            let row = &sel[r * e..(r + 1) * e];
            // Group score in f64: top-1 (+ top-2 when the group has ≥ 2 experts).
            let mut scores: Vec<(f64, usize)> = (0..g)
                .map(|gi| {
                    let members = &row[gi * per..(gi + 1) * per];
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &v in members {
                        if v > a {
                            b = a;
                            a = v;
                        } else if v > b {
                            b = v;
                        }
                    }
                    let s = if per >= 2 {
                        a as f64 + b as f64
                    } else {
                        a as f64
                    };
                    (s, gi)
                })
                .collect();
            // Descending score, ties → lower group index (a total order; NaN sorts last).
            scores.sort_by(|x, y| {
                y.0.partial_cmp(&x.0)
                    .unwrap_or(Ordering::Equal)
                    .then(x.1.cmp(&y.1))
            });
            for &(_, gi) in &scores[..m] {
                o[gi * per..(gi + 1) * per].copy_from_slice(&row[gi * per..(gi + 1) * per]);
            }
        });
    out
}

/// `[rows, e]` real logits and `[rows, 1]` null logits → `[rows, e + n_null]` with the null
/// logit repeated in the last `n_null` columns.
pub(crate) fn expand_null_slots(z: &[f32], e: usize, z_null: &[f32], n_null: usize) -> Vec<f32> {
    let rows = z_null.len();
    let w = e + n_null;
    let mut out = vec![0.0f32; rows * w];
    if w == 0 {
        return out;
    }
    out.par_chunks_mut(w)
        .enumerate()
        .with_min_len(rows_per_task(w))
        .for_each(|(r, o)| {
            o[..e].copy_from_slice(&z[r * e..(r + 1) * e]);
            o[e..].iter_mut().for_each(|v| *v = z_null[r]);
        });
    out
}

/// Backward of [`expand_null_slots`]: `d_pool [rows, e + n_null]` → (`d_z [rows, e]`,
/// `d_null [rows]` = Σ over the null columns in column order, accumulated in f64).
pub(crate) fn reduce_null_slots(d_pool: &[f32], e: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = d_pool.len().checked_div(w).unwrap_or(0);
    let mut dz = vec![0.0f32; rows * e];
    let dnull: Vec<f32> = (0..rows)
        .into_par_iter()
        .with_min_len(rows_per_task(w))
        .map(|r| {
            d_pool[r * w + e..(r + 1) * w]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>() as f32
        })
        .collect();
    if e > 0 {
        dz.par_chunks_mut(e)
            .enumerate()
            .with_min_len(rows_per_task(e))
            .for_each(|(r, o)| o.copy_from_slice(&d_pool[r * w..r * w + e]));
    }
    (dz, dnull)
}

/// `g / (Σ_row g + eps)` per row of `g [rows, k]` (sum in f64).
pub(crate) fn normalize_rows(g: &[f32], k: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; g.len()];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k)
        .enumerate()
        .with_min_len(rows_per_task(k))
        .for_each(|(r, o)| {
            let row = &g[r * k..(r + 1) * k];
            let s = (row.iter().map(|&v| v as f64).sum::<f64>() + eps as f64) as f32;
            o.iter_mut().zip(row).for_each(|(o, &v)| *o = v / s);
        });
    out
}

/// Backward of [`normalize_rows`]: with `S = Σ g + eps`, `n = g / S`,
/// `dg_i = (dn_i − Σ_j dn_j n_j) / S`.
pub(crate) fn normalize_rows_backward(g: &[f32], dn: &[f32], k: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; g.len()];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k)
        .enumerate()
        .with_min_len(rows_per_task(k))
        .for_each(|(r, o)| {
            let row = &g[r * k..(r + 1) * k];
            let drow = &dn[r * k..(r + 1) * k];
            let s = row.iter().map(|&v| v as f64).sum::<f64>() + eps as f64;
            let dot: f64 = row
                .iter()
                .zip(drow)
                .map(|(&v, &d)| (v as f64 / s) * d as f64)
                .sum();
            o.iter_mut()
                .zip(drow)
                .for_each(|(o, &d)| *o = ((d as f64 - dot) / s) as f32);
        });
    out
}

/// `1.0` where `idx < n_real` (a real expert), else `0.0` (a null slot).
pub(crate) fn real_slot_mask(idx: &[i32], n_real: usize) -> Vec<f32> {
    idx.iter()
        .map(|&i| if (i as usize) < n_real { 1.0 } else { 0.0 })
        .collect()
}

/// Capacity selection over assignments `idx [t, k]` (pool slots; `< n_real` = real expert)
/// with gates `gates [t, k]`. Returns keep `[t, k]`: 1.0 for a kept real assignment, 0.0
/// for a dropped one or a null slot. `by_gate`: keep the `capacity` highest gates per expert
/// (ties → lower token, then lower slot); else keep the first `capacity` in (token, slot)
/// order. `capacity = None` keeps every real assignment.
pub(crate) fn capacity_keep(
    idx: &[i32],
    gates: &[f32],
    n_real: usize,
    capacity: Option<usize>,
    by_gate: bool,
) -> Vec<f32> {
    let mut keep = real_slot_mask(idx, n_real);
    let Some(cap) = capacity else {
        return keep;
    };
    // Assignments per expert in (token, slot) = flat index order.
    let mut per_expert: Vec<Vec<usize>> = vec![Vec::new(); n_real];
    for (a, &i) in idx.iter().enumerate() {
        if (i as usize) < n_real {
            per_expert[i as usize].push(a);
        }
    }
    for mine in per_expert.iter_mut().filter(|m| m.len() > cap) {
        if by_gate {
            // Stable sort on descending gate keeps (token, slot) order among equal gates.
            mine.sort_by(|&a, &b| gates[b].partial_cmp(&gates[a]).unwrap_or(Ordering::Equal));
        }
        for &a in &mine[cap..] {
            keep[a] = 0.0;
        }
    }
    keep
}

/// Per-segment slot counts: `idx [t, k]` slots, optional `keep [t, k]` (count only where
/// non-zero), segments of `seg` consecutive tokens → `[t / seg, n_slots]` f32.
pub(crate) fn slot_counts(
    idx: &[i32],
    k: usize,
    keep: Option<&[f32]>,
    n_slots: usize,
    seg: usize,
) -> Vec<f32> {
    let t = idx.len().checked_div(k).unwrap_or(0);
    let n_seg = t.checked_div(seg).unwrap_or(0);
    let mut out = vec![0.0f32; n_seg * n_slots];
    for (a, &i) in idx.iter().enumerate() {
        if keep.is_some_and(|w| w[a] == 0.0) {
            continue;
        }
        out[(a / k / seg) * n_slots + i as usize] += 1.0;
    }
    out
}

/// Stable counting sort of the kept assignments by expert.
///
/// Returns (`token [R]`, `assignment [R]` = flat `t·k + j`, `counts [n_real]`): the kept
/// assignments of expert 0 first, then expert 1, …; inside an expert in (token, slot) order.
pub(crate) fn sort_by_expert(
    idx: &[i32],
    k: usize,
    keep: &[f32],
    n_real: usize,
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut counts = vec![0i32; n_real];
    for (a, &i) in idx.iter().enumerate() {
        if keep[a] != 0.0 && (i as usize) < n_real {
            counts[i as usize] += 1;
        }
    }
    let mut fill = vec![0usize; n_real];
    let mut acc = 0usize;
    for (f, &c) in fill.iter_mut().zip(&counts) {
        *f = acc;
        acc += c as usize;
    }
    let mut token = vec![0i32; acc];
    let mut assignment = vec![0i32; acc];
    for (a, &i) in idx.iter().enumerate() {
        if keep[a] != 0.0 && (i as usize) < n_real {
            let p = &mut fill[i as usize];
            token[*p] = (a / k) as i32;
            assignment[*p] = a as i32;
            *p += 1;
        }
    }
    (token, assignment, counts)
}

/// Copies groups of rows `x [Σ counts, row]` into `[groups · cap, row]`, group `g` at rows
/// `g·cap ..`, padding each group with zero rows up to `cap` (`counts[g] ≤ cap`).
pub(crate) fn pad_groups(x: &[f32], row: usize, counts: &[i32], cap: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; counts.len() * cap * row];
    let mut src = 0usize;
    for (g, &c) in counts.iter().enumerate() {
        let n = c as usize * row;
        out[g * cap * row..g * cap * row + n].copy_from_slice(&x[src..src + n]);
        src += n;
    }
    out
}

/// Inverse of [`pad_groups`]: drops the pad rows.
pub(crate) fn unpad_groups(x: &[f32], row: usize, counts: &[i32], cap: usize) -> Vec<f32> {
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    let mut out = Vec::with_capacity(total * row);
    for (g, &c) in counts.iter().enumerate() {
        out.extend_from_slice(&x[g * cap * row..g * cap * row + c as usize * row]);
    }
    out
}

/// Aux-loss-free bias step: `Δb_i = rate · sign(mean(c) − c_i)` (sign 0 at 0), minus
/// `mean(Δb)` when `centre` (mean in f64).
pub(crate) fn expert_bias_step(counts: &[f32], rate: f32, centre: bool) -> Vec<f32> {
    let n = counts.len();
    if n == 0 {
        return Vec::new();
    }
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / n as f64;
    let mut delta: Vec<f32> = counts
        .iter()
        .map(|&c| {
            let diff = mean - c as f64;
            if diff > 0.0 {
                rate
            } else if diff < 0.0 {
                -rate
            } else {
                0.0
            }
        })
        .collect();
    if centre {
        let m = (delta.iter().map(|&d| d as f64).sum::<f64>() / n as f64) as f32;
        delta.iter_mut().for_each(|d| *d -= m);
    }
    delta
}
