//! Device-scalar ops: scaling by a rank-0 tensor, `where`, integer add. They let
//! clipping, Muon and step statistics stay on the device (no host read of a norm or a
//! count to compute the next op's argument).

use crate::{DType, Error, Result, Tensor};

/// The device-scalar and mask kernel family of a [`Backend`](crate::backend::Backend).
pub trait ScalarKernels {
    /// `x · s` for a one-element float tensor `s`.
    fn scale_by(&self, x: &Tensor, s: &Tensor) -> Result<Tensor>;
    /// In place `x ← x · s` (`x` becomes f32).
    fn scale_by_assign(&self, x: &mut Tensor, s: &Tensor) -> Result<()>;
    /// `cond ≠ 0 ? on_true : on_false` elementwise (equal shapes), f32.
    fn where_cond(&self, cond: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor>;
    /// Wrapping i32 sum of equal-shaped i32 tensors.
    fn add_i32(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// f32 `1` where `x > thr` (NaN false), else `0`; any dtype in.
    fn gt_scalar(&self, x: &Tensor, thr: f32) -> Result<Tensor>;
    /// f32 `1` where `x == value`, else `0`; any dtype in.
    fn eq_scalar(&self, x: &Tensor, value: f32) -> Result<Tensor>;
}

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
        self.backend().scale_by(self, s)
    }

    /// In place `self ← self · s` for a one-element f32 tensor `s`. Copy-on-write if the
    /// buffer is shared.
    pub fn scale_by_assign(&mut self, s: &Tensor) -> Result<()> {
        const OP: &str = "scale_by_assign";
        check_scalar(OP, self, s)?;
        let s = self.unaliased(s)?;
        self.backend().scale_by_assign(self, &s)
    }

    /// Elementwise select: `self` is a condition (non-zero = true, e.g. a 0/1 mask from
    /// `gt_scalar`); result `on_true` where it holds, else `on_false`. All three shapes
    /// equal; result f32.
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        const OP: &str = "where_cond";
        self.same_shape(OP, on_true)?;
        self.same_shape(OP, on_false)?;
        self.backend().where_cond(self, on_true, on_false)
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
        self.backend().add_i32(self, rhs)
    }
}
