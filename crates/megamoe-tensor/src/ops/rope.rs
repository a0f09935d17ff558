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
    /// In place: the first `rotated` (1..=nH) heads of each position of `x [B, T, nH, D]`
    /// rotated as [`RopeKernels::rope`] rotates them (same bits); the other heads keep
    /// their values. Copy-on-write if `x`'s buffer is shared.
    fn rope_leading_in_place(
        &self,
        x: &mut Tensor,
        theta: f32,
        sign: f32,
        rotated: usize,
    ) -> Result<()>;
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

    /// In place: RoPE (`backward`: its gradient, the rotation by the negative angle) on the
    /// first `rotated` heads of each position of `self [B, T, NH, D]`, the other heads
    /// untouched — the q and k heads of a fused q|k|v projection `[B, T, NH + 2·NKV, D]`
    /// (`rotated = NH + NKV`), whose v heads are not rotated. Each rotated head gets the
    /// bits [`Tensor::rope`] gives it. Copy-on-write if the buffer is shared.
    pub fn rope_leading_in_place(
        &mut self,
        theta: f32,
        rotated: usize,
        backward: bool,
    ) -> Result<()> {
        const OP: &str = "rope_leading_in_place";
        let (_, nh, _) = check(OP, self, theta)?;
        if rotated == 0 || rotated > nh {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "rotated",
                value: rotated.to_string(),
                rule: "must be in 1..=heads (the tensor's dim 2)",
            });
        }
        let sign = if backward { -1.0 } else { 1.0 };
        self.backend()
            .rope_leading_in_place(self, theta, sign, rotated)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_bits as bits;
    use crate::{Device, Tensor};

    #[test]
    fn leading_heads_in_place_are_rope_of_those_heads_bitwise_and_the_rest_untouched() {
        // B 2, T 3, 5 heads of D 4; the first 3 rotated
        let x = Tensor::randn_named(1, "x", vec![2, 3, 5, 4], 1.0, Device::Cpu).unwrap();
        for backward in [false, true] {
            let mut y = x.clone();
            y.rope_leading_in_place(1e4, 3, backward).unwrap();
            let lead = x.narrow(2, 0, 3).unwrap();
            let want = if backward {
                lead.rope_backward(1e4).unwrap()
            } else {
                lead.rope(1e4).unwrap()
            };
            assert_eq!(bits(&y.narrow(2, 0, 3).unwrap()), bits(&want));
            assert_eq!(
                bits(&y.narrow(2, 3, 2).unwrap()),
                bits(&x.narrow(2, 3, 2).unwrap())
            );
        }
        let mut y = x.clone();
        let e = y
            .rope_leading_in_place(1e4, 6, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotated") && e.contains("1..=heads"), "{e}");
    }
}
