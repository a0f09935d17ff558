//! Softmax over the last dimension, its log form, the causal (attention) variant, and
//! their backward passes.

use crate::cpu::softmax as kernel;
use crate::{Error, Result, Tensor};

fn last_dim(t: &Tensor, op: &'static str) -> Result<usize> {
    match t.dims().last() {
        Some(&h) => Ok(h),
        None => Err(t.rank_error(op, "x", 1)),
    }
}

impl Tensor {
    /// `softmax` over the last dimension (any rank ≥ 1): `y = e^(x−max) / Σ e^(x−max)`.
    pub fn softmax(&self) -> Result<Tensor> {
        const OP: &str = "softmax";
        let h = last_dim(self, OP)?;
        let x = self.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::softmax(&x, h, 1.0, |_| h),
            self.shape(),
        ))
    }

    /// Backward of [`Tensor::softmax`]: `self` is the output `y`; returns
    /// `dx = y ⊙ (dy − Σ_j y_j dy_j)`, written fresh.
    pub fn softmax_backward(&self, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax_backward";
        self.same_shape(OP, dy)?;
        let h = last_dim(self, OP)?;
        let y = self.cpu_f32(OP, "y")?;
        let d = dy.cpu_f32(OP, "dy")?;
        Ok(Tensor::cpu_f32_from(
            kernel::softmax_backward(&y, &d, h, 1.0),
            self.shape(),
        ))
    }

    /// `log_softmax` over the last dimension: `x − logsumexp(x)`.
    pub fn log_softmax(&self) -> Result<Tensor> {
        const OP: &str = "log_softmax";
        let h = last_dim(self, OP)?;
        let x = self.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::log_softmax(&x, h),
            self.shape(),
        ))
    }

    /// Backward of [`Tensor::log_softmax`]: `self` is the output `y`; `dx = dy − e^y Σ dy`.
    pub fn log_softmax_backward(&self, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "log_softmax_backward";
        self.same_shape(OP, dy)?;
        let h = last_dim(self, OP)?;
        let y = self.cpu_f32(OP, "y")?;
        let d = dy.cpu_f32(OP, "dy")?;
        Ok(Tensor::cpu_f32_from(
            kernel::log_softmax_backward(&y, &d, h),
            self.shape(),
        ))
    }

    /// Causal attention softmax: `self` is scores `[BH, T, T]` (query t, key s); returns
    /// `y[b, t, :] = softmax(scale · x[b, t, 0..=t])`, with `y[b, t, s] = 0` for `s > t`.
    pub fn causal_softmax(&self, scale: f32) -> Result<Tensor> {
        const OP: &str = "causal_softmax";
        let t = causal_dims(self, OP)?;
        let x = self.cpu_f32(OP, "scores")?;
        // Row r of the flattened [BH·T, T] view is query position r mod T; it sees keys 0..=t.
        Ok(Tensor::cpu_f32_from(
            kernel::softmax(&x, t, scale, |r| r % t + 1),
            self.shape(),
        ))
    }

    /// Backward of [`Tensor::causal_softmax`] (`self` is its output `y`): `d_scores =
    /// scale · y ⊙ (dy − ⟨y, dy⟩)`; masked positions get 0 because `y` is 0 there.
    pub fn causal_softmax_backward(&self, dy: &Tensor, scale: f32) -> Result<Tensor> {
        const OP: &str = "causal_softmax_backward";
        self.same_shape(OP, dy)?;
        let t = causal_dims(self, OP)?;
        let y = self.cpu_f32(OP, "y")?;
        let d = dy.cpu_f32(OP, "dy")?;
        Ok(Tensor::cpu_f32_from(
            kernel::softmax_backward(&y, &d, t, scale),
            self.shape(),
        ))
    }
}

fn causal_dims(x: &Tensor, op: &'static str) -> Result<usize> {
    match *x.dims() {
        [_, t, s] if t == s => Ok(t),
        [_, _, _] => Err(Error::ShapeMismatch {
            op,
            lhs: x.dims().to_vec(),
            rhs: x.dims().to_vec(),
            rule: "scores must be [BH, T, T] (square in the last two dims)",
        }),
        _ => Err(x.rank_error(op, "scores", 3)),
    }
}
