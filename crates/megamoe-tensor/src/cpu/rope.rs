//! CPU rotary position embedding, rotate-half convention (GPT-NeoX / Llama in Hugging Face):
//! pairs are `(x[i], x[i + D/2])` for `i < D/2`, rotated by angle `t · θ^(−2i/D)`.

use rayon::prelude::*;

use super::par_rows;

/// The cos/sin table `[T, D/2]` (sin times `sign`), computed in f64 then rounded once.
fn table(t: usize, d: usize, theta: f32, sign: f32) -> (Vec<f32>, Vec<f32>) {
    let half = d / 2;
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
    (cos, sin)
}

/// One head row `xr` (D elements) at position `p` rotated into `o`.
fn rotate(xr: &[f32], o: &mut [f32], p: usize, (cos, sin): (&[f32], &[f32])) {
    let half = xr.len() / 2;
    let (c, s) = (
        &cos[p * half..(p + 1) * half],
        &sin[p * half..(p + 1) * half],
    );
    for i in 0..half {
        let (x1, x2) = (xr[i], xr[i + half]);
        o[i] = x1 * c[i] - x2 * s[i];
        o[i + half] = x2 * c[i] + x1 * s[i];
    }
}

/// Applies the rotation to `x [B, T, NH, D]` with `sign = +1` (forward) or `−1` (backward:
/// the transpose of a rotation is the rotation by the negative angle).
pub(crate) fn rope(x: &[f32], t: usize, nh: usize, d: usize, theta: f32, sign: f32) -> Vec<f32> {
    let (cos, sin) = table(t, d, theta, sign);
    let rows = x.len().checked_div(d).unwrap_or(0);
    par_rows(x, d, d, rows, |r, xr, o| {
        rotate(xr, o, (r / nh) % t, (&cos, &sin))
    })
}

/// [`rope`] in place on the first `rotated` heads of each position of `x [B, T, NH, D]`
/// (the other heads untouched): the same bits per rotated head.
pub(crate) fn rope_leading_in_place(
    x: &mut [f32],
    (t, nh, d): (usize, usize, usize),
    rotated: usize,
    theta: f32,
    sign: f32,
) {
    let (cos, sin) = table(t, d, theta, sign);
    if nh == 0 || d == 0 {
        return;
    }
    x.par_chunks_mut(nh * d).enumerate().for_each(|(pos, row)| {
        for head in row[..rotated * d].chunks_mut(d) {
            let xr = head.to_vec();
            rotate(&xr, head, pos % t, (&cos, &sin));
        }
    });
}
