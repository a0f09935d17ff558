//! Softmax over the last dimension, its log form, the causal (attention) variant, and
//! their backward passes.

use crate::{Error, Result, Tensor};

/// Which softmax ([`SoftmaxKernels`]); all over the last dimension `H`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SoftmaxKind {
    /// `exp(x) / Σ exp(x)`.
    Plain,
    /// `x − log Σ exp(x)`.
    Log,
    /// Scores `[BH, T, T]`: `softmax(scale · x)` over keys `0..=t` of query row `t`, 0
    /// beyond.
    Causal {
        /// The factor applied to the scores.
        scale: f32,
    },
}

/// The softmax kernel family of a [`Backend`](crate::backend::Backend).
pub trait SoftmaxKernels {
    /// `kind`-softmax of `x`, f32 of `x`'s shape.
    fn softmax(&self, x: &Tensor, kind: SoftmaxKind) -> Result<Tensor>;
    /// `dx` of `kind`-softmax from its output `y` and `dy` (equal shapes).
    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, kind: SoftmaxKind) -> Result<Tensor>;
}

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
        last_dim(self, OP)?;
        self.backend().softmax(self, SoftmaxKind::Plain)
    }

    /// Backward of [`Tensor::softmax`]: `self` is the output `y`; returns
    /// `dx = y ⊙ (dy − Σ_j y_j dy_j)`, written fresh.
    pub fn softmax_backward(&self, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "softmax_backward";
        self.same_shape(OP, dy)?;
        last_dim(self, OP)?;
        self.backend()
            .softmax_backward(self, dy, SoftmaxKind::Plain)
    }

    /// `log_softmax` over the last dimension: `x − logsumexp(x)`.
    pub fn log_softmax(&self) -> Result<Tensor> {
        const OP: &str = "log_softmax";
        last_dim(self, OP)?;
        self.backend().softmax(self, SoftmaxKind::Log)
    }

    /// Backward of [`Tensor::log_softmax`]: `self` is the output `y`; `dx = dy − e^y Σ dy`.
    pub fn log_softmax_backward(&self, dy: &Tensor) -> Result<Tensor> {
        const OP: &str = "log_softmax_backward";
        self.same_shape(OP, dy)?;
        last_dim(self, OP)?;
        self.backend().softmax_backward(self, dy, SoftmaxKind::Log)
    }

    /// Causal attention softmax: `self` is scores `[BH, T, T]` (query t, key s); returns
    /// `y[b, t, :] = softmax(scale · x[b, t, 0..=t])`, with `y[b, t, s] = 0` for `s > t`.
    pub fn causal_softmax(&self, scale: f32) -> Result<Tensor> {
        const OP: &str = "causal_softmax";
        causal_dims(self, OP)?;
        self.backend().softmax(self, SoftmaxKind::Causal { scale })
    }

    /// Backward of [`Tensor::causal_softmax`] (`self` is its output `y`): `d_scores =
    /// scale · y ⊙ (dy − ⟨y, dy⟩)`; masked positions get 0 because `y` is 0 there.
    pub fn causal_softmax_backward(&self, dy: &Tensor, scale: f32) -> Result<Tensor> {
        const OP: &str = "causal_softmax_backward";
        self.same_shape(OP, dy)?;
        causal_dims(self, OP)?;
        self.backend()
            .softmax_backward(self, dy, SoftmaxKind::Causal { scale })
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
