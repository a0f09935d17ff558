//! Fused optimizer ops: one pass over a parameter and its state per update, in place.

use crate::{DType, Error, Result, Tensor};

/// The fused-optimizer kernel family of a [`Backend`](crate::backend::Backend).
pub trait OptimKernels {
    /// One AdamW update of `param` and its moments `m`, `v` from `grad` (equal shapes), in
    /// place, with hyper-parameters `h` (see [`Tensor::adamw_step`] for the formula; the
    /// CPU backend rounds the step constants to f32 exactly as the unfused ops would). The
    /// moments are both f32 or both bf16 (checked by the op) and keep their dtype.
    fn adamw(
        &self,
        param: &mut Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        grad: &Tensor,
        h: &AdamWStep,
    ) -> Result<()>;
}

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
    /// `self` is the parameter, `exp_avg` (m) and `exp_avg_sq` (v) its moments, all
    /// shaped like `grad`. Each element is computed with exactly the f32 operations, in
    /// the same order, as the unfused sequence of `scale`, `axpy`, `square`, `sqrt`,
    /// `add_scalar` and `div`, so results are bit-identical to it. Copy-on-write for any
    /// of the three buffers that is shared.
    ///
    /// The moments are both f32 or both bf16 (`optim.moment_dtype`), and keep their dtype:
    /// bf16 moments are widened to f32, go through the same f32 operations (the parameter's
    /// update uses the new, unrounded f32 moments) and are stored rounded to nearest even.
    /// Mixed or other moment dtypes are refused by name.
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
        let moments = exp_avg.dtype();
        if !matches!(moments, DType::F32 | DType::BF16) || exp_avg_sq.dtype() != moments {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "exp_avg, exp_avg_sq",
                value: format!("{:?} and {:?}", moments, exp_avg_sq.dtype()),
                rule: "the two moments are both f32 or both bf16",
            });
        }
        // Write-through views are written where they are: two written ones must not
        // overlap (copy-on-write buffers are copied by the write instead).
        let clash = |a: &Tensor, b: &Tensor| a.is_write_through() && a.overlaps(b);
        if clash(self, exp_avg) || clash(self, exp_avg_sq) || clash(exp_avg, exp_avg_sq) {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "exp_avg, exp_avg_sq",
                value: "overlapping views of one buffer".into(),
                rule: "the parameter and its two moments are written: they must not overlap",
            });
        }
        // The gradient is read while the three are written (write-through views may alias).
        let aliased = [&*self, &*exp_avg, &*exp_avg_sq]
            .into_iter()
            .any(|w| clash(w, grad));
        let copy = if aliased {
            Some(grad.deep_copy()?)
        } else {
            None
        };
        let grad = copy.as_ref().unwrap_or(grad);
        self.backend().adamw(self, exp_avg, exp_avg_sq, grad, h)
    }
}
