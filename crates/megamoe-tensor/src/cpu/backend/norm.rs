//! [`NormKernels`], [`RopeKernels`] and [`LossKernels`] on the CPU.

use crate::backend::CpuBackend;
use crate::cpu::{loss, norm, rope};
use crate::ops::loss::LossKernels;
use crate::ops::norm::{NormKernels, RmsNormResidualGrads};
use crate::ops::rope::RopeKernels;
use crate::{Error, Result, Shape, Tensor};

/// `(H, rows)` of `x [.., H]`.
fn rows_of(x: &Tensor) -> (usize, usize) {
    let h = x.dims().last().copied().unwrap_or(1);
    (h, x.numel().checked_div(h).unwrap_or(0))
}

impl NormKernels for CpuBackend {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rms_norm";
        let (h, rows) = rows_of(x);
        let xd = x.cpu_f32(OP, "x")?;
        let wd = w.cpu_f32(OP, "w")?;
        let (y, rstd) = norm::rms_norm(&xd, &wd, h, eps);
        Ok((
            Tensor::cpu_f32_from(y, x.shape()),
            Tensor::cpu_f32_from(rstd, [rows]),
        ))
    }

    fn rms_norm_backward_input(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "rms_norm_backward_input";
        let (h, _) = rows_of(x);
        let (d, xd, wd, rs) = (
            dy.cpu_f32(OP, "dy")?,
            x.cpu_f32(OP, "x")?,
            w.cpu_f32(OP, "w")?,
            rstd.cpu_f32(OP, "rstd")?,
        );
        Ok(Tensor::cpu_f32_from(
            norm::rms_norm_backward_input(&d, &xd, &wd, &rs, h),
            x.shape(),
        ))
    }

    fn rms_norm_backward_weight(&self, dy: &Tensor, x: &Tensor, rstd: &Tensor) -> Result<Tensor> {
        const OP: &str = "rms_norm_backward_weight";
        let (h, _) = rows_of(x);
        let (d, xd, rs) = (
            dy.cpu_f32(OP, "dy")?,
            x.cpu_f32(OP, "x")?,
            rstd.cpu_f32(OP, "rstd")?,
        );
        Ok(Tensor::cpu_f32_from(
            norm::rms_norm_backward_weight(&d, &xd, &rs, h),
            [h],
        ))
    }

    fn rms_norm_backward_add(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        residual: &Tensor,
        _act: bool,
    ) -> Result<RmsNormResidualGrads> {
        // The unfused ops in sequence (same bits): the CPU has no pass to save.
        let dx = self.rms_norm_backward_input(dy, x, w, rstd)?;
        let sum = residual.add(&dx)?;
        Ok(RmsNormResidualGrads {
            act: sum.clone(),
            sum,
            d_w: self.rms_norm_backward_weight(dy, x, rstd)?,
        })
    }
}

impl RopeKernels for CpuBackend {
    fn rope(&self, x: &Tensor, theta: f32, sign: f32) -> Result<Tensor> {
        let (_, t, nh, d) = x.dims4()?;
        let xd = x.cpu_f32("rope", "x")?;
        Ok(Tensor::cpu_f32_from(
            rope::rope(&xd, t, nh, d, theta, sign),
            x.shape(),
        ))
    }

    fn rope_leading_in_place(
        &self,
        x: &mut Tensor,
        theta: f32,
        sign: f32,
        rotated: usize,
    ) -> Result<()> {
        let (_, t, nh, d) = x.dims4()?;
        let xs = x.cpu_f32_mut("rope_leading_in_place")?;
        rope::rope_leading_in_place(xs, (t, nh, d), rotated, theta, sign);
        Ok(())
    }
}

impl LossKernels for CpuBackend {
    fn cross_entropy(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "cross_entropy";
        let (n, v) = logits.dims2()?;
        let t = targets.cpu_i32(OP, "targets")?;
        let mut valid = 0usize;
        for (position, &ti) in t.iter().enumerate() {
            if ti == ignore_index {
                continue;
            }
            if ti < 0 || ti as usize >= v {
                return Err(Error::IndexOutOfRange {
                    op: OP,
                    index: ti as i64,
                    position,
                    bound: v,
                });
            }
            valid += 1;
        }
        let scale = if valid == 0 { 0.0 } else { 1.0 / valid as f64 };
        let x = logits.cpu_f32(OP, "logits")?;
        let target = |r: usize| {
            if t[r] == ignore_index {
                None
            } else {
                Some(t[r] as usize)
            }
        };
        let (losses, grad) = loss::cross_entropy(&x, v, target, scale);
        let loss = losses.iter().sum::<f64>() * scale;
        Ok((
            Tensor::cpu_f32_from(vec![loss as f32], Shape::from(Vec::new())),
            Tensor::cpu_f32_from(grad, [n, v]),
        ))
    }
}
