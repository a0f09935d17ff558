//! Fused optimizer ops: one pass over a parameter and its state per update, in place.

use crate::cpu::optim as kernel;
use crate::{Result, Tensor};

/// Scalars of one AdamW step (PyTorch `torch.optim.AdamW` order; see [`Tensor::adamw_step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate η.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay λ (0 for none).
    pub weight_decay: f64,
    /// 1-based step count t for the bias corrections `1 − βᵗ` (0 counts as 1).
    pub t: u64,
}

impl Tensor {
    /// One fused AdamW update in place, a single pass over the elements:
    ///
    /// ```text
    /// m ← β1·m + (1 − β1)·g
    /// v ← β2·v + (1 − β2)·g²
    /// p ← p·(1 − ηλ) − η/(1 − β1ᵗ) · m / (√(v/(1 − β2ᵗ)) + ε)
    /// ```
    ///
    /// `self` is the parameter, `exp_avg` (m) and `exp_avg_sq` (v) its f32 moments, all
    /// shaped like `grad`. Each element is computed with exactly the f32 operations, in
    /// the same order, as the unfused sequence of `scale`, `axpy`, `square`, `sqrt`,
    /// `add_scalar` and `div`, so results are bit-identical to it. Copy-on-write for any
    /// of the three buffers that is shared.
    pub fn adamw_step(
        &mut self,
        exp_avg: &mut Tensor,
        exp_avg_sq: &mut Tensor,
        grad: &Tensor,
        h: &AdamWStep,
    ) -> Result<()> {
        const OP: &str = "adamw_step";
        self.same_shape(OP, grad)?;
        exp_avg.same_shape(OP, grad)?;
        exp_avg_sq.same_shape(OP, grad)?;
        // t = 0 is treated as 1, as `adamw_update` always did.
        let t = h.t.clamp(1, i32::MAX as u64) as i32;
        let consts = kernel::AdamWConsts {
            beta1: h.beta1 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            inv_bc2: (1.0 / (1.0 - h.beta2.powi(t))) as f32,
            eps: h.eps as f32,
            decay: (h.weight_decay != 0.0).then_some((1.0 - h.lr * h.weight_decay) as f32),
            step: (-h.lr / (1.0 - h.beta1.powi(t))) as f32,
        };
        let g = grad.cpu_f32(OP, "grad")?;
        let m = exp_avg.cpu_f32_mut(OP)?;
        let v = exp_avg_sq.cpu_f32_mut(OP)?;
        let p = self.cpu_f32_mut(OP)?;
        kernel::adamw(p, m, v, &g, &consts);
        Ok(())
    }
}
