//! CPU rotary position embedding, rotate-half convention (GPT-NeoX / Llama in Hugging Face):
//! pairs are `(x[i], x[i + D/2])` for `i < D/2`, rotated by angle `t · θ^(−2i/D)`.

use super::par_rows;

/// Applies the rotation to `x [B, T, NH, D]` with `sign = +1` (forward) or `−1` (backward:
/// the transpose of a rotation is the rotation by the negative angle).
pub(crate) fn rope(x: &[f32], t: usize, nh: usize, d: usize, theta: f32, sign: f32) -> Vec<f32> {
    let half = d / 2;
    // cos/sin table [T, D/2], computed in f64 then rounded once.
    let mut cos = vec![0.0f32; t * half];
    let mut sin = vec![0.0f32; t * half];
    for p in 0..t {
        for i in 0..half {
            let freq = (theta as f64).powf(-2.0 * i as f64 / d as f64);
            let a = p as f64 * freq;
            cos[p * half + i] = a.cos() as f32;
            sin[p * half + i] = (sign as f64 * a.sin()) as f32;
        }
    }
    let rows = x.len().checked_div(d).unwrap_or(0);
    par_rows(x, d, d, rows, |r, xr, o| {
        let p = (r / nh) % t;
        let (c, s) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for i in 0..half {
            let (x1, x2) = (xr[i], xr[i + half]);
            o[i] = x1 * c[i] - x2 * s[i];
            o[i + half] = x2 * c[i] + x1 * s[i];
        }
    })
}
