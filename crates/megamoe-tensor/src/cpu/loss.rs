//! CPU cross-entropy over rows of logits, in f64 per row.

use rayon::prelude::*;

use super::rows_per_task;
use super::softmax::logsumexp_row;

/// Per-row losses `lse(x) − x[target]` in f64 (0 for rows without a target) and
/// `d_logits = (softmax(x) − onehot(target)) · scale` (0 for rows without a target).
pub(crate) fn cross_entropy(
    logits: &[f32],
    v: usize,
    target: impl Fn(usize) -> Option<usize> + Sync + Send,
    scale: f64,
) -> (Vec<f64>, Vec<f32>) {
    let rows = logits.len().checked_div(v).unwrap_or(0);
    let mut grad = vec![0.0f32; rows * v];
    let mut loss = vec![0.0f64; rows];
    if rows == 0 {
        return (loss, grad);
    }
    let per = rows_per_task(v);
    grad.par_chunks_mut(per * v)
        .zip(loss.par_chunks_mut(per))
        .enumerate()
        .for_each(|(c, (g, l))| {
            for (i, (grow, lr)) in g.chunks_mut(v).zip(l.iter_mut()).enumerate() {
                let r = c * per + i;
                let Some(t) = target(r) else { continue };
                let xr = &logits[r * v..(r + 1) * v];
                let lse = logsumexp_row(xr);
                *lr = lse - xr[t] as f64;
                for (o, &x) in grow.iter_mut().zip(xr) {
                    *o = ((x as f64 - lse).exp() * scale) as f32;
                }
                grow[t] = (((xr[t] as f64 - lse).exp() - 1.0) * scale) as f32;
            }
        });
    (loss, grad)
}
