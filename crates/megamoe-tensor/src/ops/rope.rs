//! Rotary position embedding (Su et al. 2021, RoFormer), rotate-half convention as in
//! Llama/GPT-NeoX (Hugging Face `rotate_half`): for head dim `D` and `i < D/2`, the pair
//! `(x_i, x_{i+D/2})` at position `t` is rotated by `t · θ^(−2i/D)`:
//! `y_i = x_i cos − x_{i+D/2} sin`, `y_{i+D/2} = x_{i+D/2} cos + x_i sin`.
//! Positions are `0..T` within each sequence. Backward is the rotation by the negative angle.

use crate::{Error, Result, Tensor};

/// The RoPE kernel family of a [`Backend`](crate::backend::Backend).
pub trait RopeKernels {
    /// `x [B, T, nH, D]` rotated by `sign · t · θ^(−2i/D)` per pair (sign `1.0` forward,
    /// `-1.0` backward).
    fn rope(&self, x: &Tensor, theta: f32, sign: f32) -> Result<Tensor>;
}

fn check(op: &'static str, x: &Tensor, theta: f32) -> Result<(usize, usize, usize)> {
    let (_, t, nh, d) = x.dims4().map_err(|_| x.rank_error(op, "x", 4))?;
    if d % 2 != 0 {
        return Err(Error::InvalidArgument {
            op,
            arg: "head_dim",
            value: d.to_string(),
            rule: "must be even for rotate-half RoPE",
        });
    }
    if theta.is_nan() || theta <= 0.0 {
        return Err(Error::InvalidArgument {
            op,
            arg: "theta",
            value: theta.to_string(),
            rule: "must be > 0",
        });
    }
    Ok((t, nh, d))
}

impl Tensor {
    /// RoPE on `x [B, T, NH, D]` (apply before permuting heads forward) with base `theta`
    /// (e.g. 10000). Returns a fresh tensor of the same shape.
    pub fn rope(&self, theta: f32) -> Result<Tensor> {
        const OP: &str = "rope";
        check(OP, self, theta)?;
        self.backend().rope(self, theta, 1.0)
    }

    /// Backward of [`Tensor::rope`]: `self` is `dy [B, T, NH, D]`; returns `dx` (rotation by
    /// the negative angle), written fresh.
    pub fn rope_backward(&self, theta: f32) -> Result<Tensor> {
        const OP: &str = "rope_backward";
        check(OP, self, theta)?;
        self.backend().rope(self, theta, -1.0)
    }
}
