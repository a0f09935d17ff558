//! CPU softmax kernels over the last dimension. Row sums accumulate in f64 (fixed
//! sequential order), so results are stable to ~1 ulp of f32 and identical for any thread
//! count.

use super::par_rows;

/// Row-wise softmax of `x [rows, len]`, restricted to the first `valid(r)` entries of row
/// `r` (the rest are 0), after scaling by `scale`.
pub(crate) fn softmax(
    x: &[f32],
    len: usize,
    scale: f32,
    valid: impl Fn(usize) -> usize + Sync + Send,
) -> Vec<f32> {
    let rows = x.len().checked_div(len).unwrap_or(0);
    par_rows(x, len, len, rows, |r, xr, o| {
        let v = valid(r).min(len);
        if v == 0 {
            return;
        }
        let max = xr[..v]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &a| m.max(a * scale));
        let mut sum = 0.0f64;
        for (o, &a) in o[..v].iter_mut().zip(&xr[..v]) {
            let e = (a * scale - max).exp();
            *o = e;
            sum += e as f64;
        }
        let inv = 1.0 / sum;
        for o in &mut o[..v] {
            *o = (*o as f64 * inv) as f32;
        }
    })
}

/// Row-wise `log_softmax` of `x [rows, len]`.
pub(crate) fn log_softmax(x: &[f32], len: usize) -> Vec<f32> {
    let rows = x.len().checked_div(len).unwrap_or(0);
    par_rows(x, len, len, rows, |_, xr, o| {
        let lse = logsumexp_row(xr);
        for (o, &a) in o.iter_mut().zip(xr) {
            *o = ((a as f64) - lse) as f32;
        }
    })
}

/// `log Σ exp(x)` of one row in f64 (−∞ for an empty row).
pub(crate) fn logsumexp_row(xr: &[f32]) -> f64 {
    let max = xr.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = xr.iter().map(|&a| ((a - max) as f64).exp()).sum();
    max as f64 + sum.ln()
}

/// Softmax backward `dx = scale · y ⊙ (dy − ⟨y, dy⟩)` per row.
pub(crate) fn softmax_backward(y: &[f32], dy: &[f32], len: usize, scale: f32) -> Vec<f32> {
    let rows = y.len().checked_div(len).unwrap_or(0);
    par_rows(y, len, len, rows, |r, yr, o| {
        let dyr = &dy[r * len..(r + 1) * len];
        let dot: f64 = yr.iter().zip(dyr).map(|(&a, &b)| a as f64 * b as f64).sum();
        for ((o, &a), &b) in o.iter_mut().zip(yr).zip(dyr) {
            *o = (scale as f64 * a as f64 * (b as f64 - dot)) as f32;
        }
    })
}

/// Log-softmax backward `dx = dy − exp(y) Σ dy` per row (`y` is the log-softmax output).
pub(crate) fn log_softmax_backward(y: &[f32], dy: &[f32], len: usize) -> Vec<f32> {
    let rows = y.len().checked_div(len).unwrap_or(0);
    par_rows(y, len, len, rows, |r, yr, o| {
        let dyr = &dy[r * len..(r + 1) * len];
        let s: f64 = dyr.iter().map(|&b| b as f64).sum();
        for ((o, &a), &b) in o.iter_mut().zip(yr).zip(dyr) {
            *o = (b as f64 - (a as f64).exp() * s) as f32;
        }
    })
}
