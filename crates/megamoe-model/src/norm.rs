//! RMSNorm: `y = x / rms(x) ⊙ w`, `rms(x) = √(mean_j x_j² + ε)` over the last dim (Zhang &
//! Sennrich 2019). `x [N, H]`, `w [H]`. Forward saves `x` and `rstd [N] = 1/rms(x)`.
//!
//! Backward (with `x̂ = x ⊙ rstd`, `g = dy ⊙ w`):
//! `dx = rstd ⊙ (g − x̂ ⊙ mean_j(g ⊙ x̂))`, `dw = Σ_n dy ⊙ x̂` (accumulated). The kernels are
//! megamoe-tensor's fused `rms_norm*` ops; this file adds the optional weight.
//! [`RmsNorm::backward_add`] folds `dx` into the residual stream's gradient in the same pass
//! (a pre-norm block's `d_x = d_residual + N'(x)ᵀ d_h`).

use megamoe_tensor::{DType, RmsNormResidualGrads, Tensor};

use crate::error::Result;

/// What RMSNorm's backward needs.
#[derive(Debug, Clone)]
pub struct RmsNormSaved {
    /// Input `[N, H]`.
    pub x: Tensor,
    /// `1/rms(x)` `[N]`.
    pub rstd: Tensor,
}

/// RMSNorm with ε; a `None` weight is the non-learnable form (MTP input norms, w = 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNorm {
    /// ε added to the mean square.
    pub eps: f32,
}

fn unit_weight(x: &Tensor) -> Result<Tensor> {
    let h = x.dims().last().copied().unwrap_or(1);
    Ok(Tensor::ones([h], DType::F32, x.device())?)
}

impl RmsNorm {
    /// `x [N, H]`, `w [H]` (or none) → `y [N, H]`.
    pub fn forward(&self, x: &Tensor, w: Option<&Tensor>) -> Result<(Tensor, RmsNormSaved)> {
        let (y, rstd) = match w {
            Some(w) => x.rms_norm(w, self.eps)?,
            None => x.rms_norm(&unit_weight(x)?, self.eps)?,
        };
        Ok((y, RmsNormSaved { x: x.clone(), rstd }))
    }

    /// Returns `dx` (fresh) and accumulates `dw` into `d_w` when given.
    pub fn backward(
        &self,
        dy: &Tensor,
        w: Option<&Tensor>,
        saved: &RmsNormSaved,
        d_w: Option<&mut Tensor>,
    ) -> Result<Tensor> {
        if let Some(d_w) = d_w {
            d_w.add_assign(&dy.rms_norm_backward_weight(&saved.x, &saved.rstd)?)?;
        }
        Ok(match w {
            Some(w) => dy.rms_norm_backward_input(&saved.x, w, &saved.rstd)?,
            None => dy.rms_norm_backward_input(&saved.x, &unit_weight(dy)?, &saved.rstd)?,
        })
    }

    /// `residual + dx` (f32, fresh) and `dw` (fresh) in one pass; with `act_copy` the sum
    /// also in the activation dtype, for a GEMM that reads it (see
    /// [`Tensor::rms_norm_backward_add`]). Same values as [`RmsNorm::backward`] added to
    /// `residual`.
    pub fn backward_add(
        &self,
        dy: &Tensor,
        w: Option<&Tensor>,
        saved: &RmsNormSaved,
        residual: &Tensor,
        act_copy: bool,
    ) -> Result<RmsNormResidualGrads> {
        let unit;
        let w = match w {
            Some(w) => w,
            None => {
                unit = unit_weight(dy)?;
                &unit
            }
        };
        Ok(dy.rms_norm_backward_add(&saved.x, w, &saved.rstd, residual, act_copy)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check, randn, Probe};

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let norm = RmsNorm { eps: 1e-5 };
        let x = randn(1, &[5, 8], 1.0);
        let w = randn(2, &[8], 1.0).add_scalar(1.0).unwrap();
        let probe = Probe::new(3, &[5, 8]);
        let (_, saved) = norm.forward(&x, Some(&w)).unwrap();
        let mut d_w =
            Tensor::zeros([8], megamoe_tensor::DType::F32, megamoe_tensor::Device::Cpu).unwrap();
        let dx = norm
            .backward(&probe.r, Some(&w), &saved, Some(&mut d_w))
            .unwrap();
        let f = |x: &Tensor, w: &Tensor| probe.loss(&norm.forward(x, Some(w)).unwrap().0);
        check("d_x", &x, &dx, |t| f(t, &w));
        check("d_w", &w, &d_w, |t| f(&x, t));
    }

    #[test]
    fn rms_norm_backward_add_matches_finite_differences() {
        // L(x, w) = probe·norm(x; w) + Σ residual ⊙ x: d_x = residual + N'ᵀ probe.
        let norm = RmsNorm { eps: 1e-5 };
        let x = randn(5, &[6, 16], 1.0);
        let w = randn(6, &[16], 1.0).add_scalar(1.0).unwrap();
        let residual = randn(7, &[6, 16], 1.0);
        let probe = Probe::new(8, &[6, 16]);
        let (_, saved) = norm.forward(&x, Some(&w)).unwrap();
        let g = norm
            .backward_add(&probe.r, Some(&w), &saved, &residual, true)
            .unwrap();
        let rh = residual.to_host_f32().unwrap();
        let linear = |x: &Tensor| -> f64 {
            let xh = x.to_host_f32().unwrap();
            xh.iter().zip(&rh).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let f =
            |x: &Tensor, w: &Tensor| probe.loss(&norm.forward(x, Some(w)).unwrap().0) + linear(x);
        check("sum", &x, &g.sum, |t| f(t, &w));
        check("d_w", &w, &g.d_w, |t| f(&x, t));
        // On the CPU: the bits of the unfused ops, and `act` is the sum itself.
        let dx = norm.backward(&probe.r, Some(&w), &saved, None).unwrap();
        let unfused = residual.add(&dx).unwrap().to_host_f32().unwrap();
        assert_eq!(g.sum.to_host_f32().unwrap(), unfused);
        assert_eq!(g.act.to_host_f32().unwrap(), unfused);
    }

    #[test]
    fn rms_norm_output_has_unit_rms() {
        // y = x/rms(x) with w = 1 has mean square 1 up to ε/(ms + ε).
        let x = randn(4, &[3, 16], 2.0);
        let (y, _) = RmsNorm { eps: 0.0 }.forward(&x, None).unwrap();
        for ms in y
            .square()
            .unwrap()
            .mean_last_dim()
            .unwrap()
            .to_host_f32()
            .unwrap()
        {
            assert!((ms - 1.0).abs() < 1e-5, "{ms}");
        }
    }
}
