//! Device-scalar ops: scaling by a rank-0 tensor, `where`, integer add. They let
//! clipping, Muon and step statistics stay on the device (no host read of a norm or a
//! count to compute the next op's argument).

use crate::cpu::elementwise as kernel;
use crate::{DType, Error, Result, Tensor};

/// Checks that `s` holds exactly one float element (a rank-0 or `[1]` tensor).
fn check_scalar(op: &'static str, x: &Tensor, s: &Tensor) -> Result<()> {
    x.same_device(op, s)?;
    if s.numel() != 1 || !s.dtype().is_float() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: x.dims().to_vec(),
            rhs: s.dims().to_vec(),
            rule: "the scale must be a one-element float tensor",
        });
    }
    Ok(())
}

impl Tensor {
    /// `self · s` for a one-element f32 tensor `s` (e.g. a clip factor or `1/‖X‖` computed
    /// on the device). Same bits as `self.scale(value of s)`.
    pub fn scale_by(&self, s: &Tensor) -> Result<Tensor> {
        const OP: &str = "scale_by";
        check_scalar(OP, self, s)?;
        let x = self.cpu_f32(OP, "x")?;
        let sv = s.cpu_f32(OP, "s")?[0];
        Ok(Tensor::cpu_f32_from(
            kernel::scale(&x, sv),
            self.shape().clone(),
        ))
    }

    /// In place `self ← self · s` for a one-element f32 tensor `s`. Copy-on-write if the
    /// buffer is shared.
    pub fn scale_by_assign(&mut self, s: &Tensor) -> Result<()> {
        const OP: &str = "scale_by_assign";
        check_scalar(OP, self, s)?;
        let sv = s.cpu_f32(OP, "s")?[0];
        kernel::scale_in_place(self.cpu_f32_mut(OP)?, sv);
        Ok(())
    }

    /// Elementwise select: `self` is a condition (non-zero = true, e.g. a 0/1 mask from
    /// `gt_scalar`); result `on_true` where it holds, else `on_false`. All three shapes
    /// equal; result f32.
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        const OP: &str = "where_cond";
        self.same_shape(OP, on_true)?;
        self.same_shape(OP, on_false)?;
        let c = self.cpu_f32(OP, "cond")?;
        let a = on_true.cpu_f32(OP, "on_true")?;
        let b = on_false.cpu_f32(OP, "on_false")?;
        Ok(Tensor::cpu_f32_from(
            kernel::select(&c, &a, &b),
            self.shape().clone(),
        ))
    }

    /// Elementwise integer sum of two i32 tensors of equal shape (counts summed over
    /// micro-batches on the device). Overflow wraps.
    pub fn add_i32(&self, rhs: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_i32";
        self.same_shape(OP, rhs)?;
        for (arg, t) in [("lhs", self), ("rhs", rhs)] {
            if t.dtype() != DType::I32 {
                return Err(Error::DTypeMismatch {
                    op: OP,
                    arg,
                    expected: "i32",
                    got: t.dtype(),
                });
            }
        }
        let a = self.cpu_i32(OP, "lhs")?;
        let b = rhs.cpu_i32(OP, "rhs")?;
        let out = a.iter().zip(b).map(|(x, y)| x.wrapping_add(*y)).collect();
        Ok(Tensor::cpu_i32_from(out, self.shape().clone()))
    }
}
