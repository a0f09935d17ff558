//! CPU RMSNorm kernels (Zhang & Sennrich 2019): `y = x · rstd · w`,
//! `rstd = 1/√(mean(x²) + ε)`. Row statistics and the weight-gradient column sums
//! accumulate in f64 in a fixed order.

use super::par_rows;
use super::reduce::sum_rows_with;

/// Forward: returns `(y [rows, h], rstd [rows])`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], h: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len().checked_div(h).unwrap_or(0);
    let rstd: Vec<f32> = super::reduce::rows_reduce(x, h, rows, |r| {
        let ms = r.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
        (1.0 / (ms + eps as f64).sqrt()) as f32
    });
    let y = par_rows(x, h, h, rows, |n, xr, o| {
        let s = rstd[n];
        for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w) {
            *o = v * s * g;
        }
    });
    (y, rstd)
}

/// Input gradient: with `x̂ = x·rstd` and `g = dy ⊙ w`,
/// `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`.
pub(crate) fn rms_norm_backward_input(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    h: usize,
) -> Vec<f32> {
    let rows = rstd.len();
    par_rows(x, h, h, rows, |n, xr, o| {
        let s = rstd[n] as f64;
        let dyr = &dy[n * h..(n + 1) * h];
        let dot: f64 = xr
            .iter()
            .zip(dyr)
            .zip(w)
            .map(|((&v, &d), &g)| (d as f64 * g as f64) * (v as f64 * s))
            .sum::<f64>()
            / h as f64;
        for (((o, &v), &d), &g) in o.iter_mut().zip(xr).zip(dyr).zip(w) {
            *o = (s * (d as f64 * g as f64 - v as f64 * s * dot)) as f32;
        }
    })
}

/// Weight gradient: `dw[j] = Σ_n dy[n, j] · x[n, j] · rstd[n]`.
pub(crate) fn rms_norm_backward_weight(dy: &[f32], x: &[f32], rstd: &[f32], h: usize) -> Vec<f32> {
    sum_rows_with(h, rstd.len(), |n, acc| {
        let s = rstd[n] as f64;
        for ((a, &d), &v) in acc
            .iter_mut()
            .zip(&dy[n * h..(n + 1) * h])
            .zip(&x[n * h..(n + 1) * h])
        {
            *a += d as f64 * v as f64 * s;
        }
    })
    .into_iter()
    .map(|v| v as f32)
    .collect()
}
