//! CPU kernels of the fused optimizer ops.

use half::bf16;
use rayon::prelude::*;

use super::ELEMS_PER_TASK;

/// The f32 constants of one AdamW step, rounded exactly as the unfused op sequence rounds
/// its scalar arguments.
pub(crate) struct AdamWConsts {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 / (1 − β2ᵗ)`.
    pub inv_bc2: f32,
    pub eps: f32,
    /// `1 − ηλ`, or `None` without weight decay.
    pub decay: Option<f32>,
    /// `−η / (1 − β1ᵗ)`.
    pub step: f32,
}

/// An element type AdamW keeps its moments in: f32, or bf16 (widened to f32 for the update,
/// stored rounded to nearest even).
pub(crate) trait Moment: Copy + Send + Sync {
    /// The value as f32 (exact).
    fn load(self) -> f32;
    /// `x` in this type (bf16: round to nearest even).
    fn store(x: f32) -> Self;
}

impl Moment for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(x: f32) -> f32 {
        x
    }
}

impl Moment for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

/// In place AdamW over equal-length `p`, `m`, `v`, `g`. Per element, the same f32
/// operations in the same order as `scale` (`x·s + 0`), `axpy` (`d += α·s`), `square`,
/// `sqrt`, `add_scalar` (`x·1 + c`) and `div`, so the bits match the unfused sequence. With
/// bf16 moments the update uses the new f32 moments; only their stored values are rounded.
pub(crate) fn adamw<M: Moment>(
    p: &mut [f32],
    m: &mut [M],
    v: &mut [M],
    g: &[f32],
    c: &AdamWConsts,
) {
    p.par_iter_mut()
        .zip(m.par_iter_mut())
        .zip(v.par_iter_mut())
        .zip(g.par_iter())
        .with_min_len(ELEMS_PER_TASK)
        .for_each(|(((p, m), v), &g)| {
            let mut mi = m.load() * c.beta1 + 0.0;
            mi += c.one_minus_beta1 * g;
            let g2 = g * g;
            let mut vi = v.load() * c.beta2 + 0.0;
            vi += c.one_minus_beta2 * g2;
            let denom = (vi * c.inv_bc2 + 0.0).sqrt() * 1.0 + c.eps;
            let step = mi / denom;
            let mut pi = match c.decay {
                Some(d) => *p * d + 0.0,
                None => *p,
            };
            pi += c.step * step;
            *p = pi;
            *m = M::store(mi);
            *v = M::store(vi);
        });
}
