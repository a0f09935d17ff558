//! RMSNorm over the last dimension, forward and the split backward (input gradient and
//! weight gradient as separate functions, for the I/W split of zero-bubble schedules).
//!
//! `y = x · rstd · w` with `rstd = 1/√(mean_j x_j² + ε)` per row (Zhang & Sennrich 2019).
//! Forward saves `rstd [N]`; both backward halves take it back. The fused backward
//! ([`Tensor::rms_norm_backward_add`]) adds the input gradient to the residual stream's
//! gradient and computes the weight gradient in the same pass.

use crate::{Error, Result, Tensor};

/// The RMSNorm kernel family of a [`Backend`](crate::backend::Backend); `x [.., H]`,
/// `w [H]`, `rstd [rows]` as in [`Tensor::rms_norm`].
pub trait NormKernels {
    /// `(y = x · rstd · w, rstd)`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)>;
    /// `dx` from `dy`, `x`, `w`, `rstd`.
    fn rms_norm_backward_input(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
    ) -> Result<Tensor>;
    /// `dw [H]` from `dy`, `x`, `rstd`.
    fn rms_norm_backward_weight(&self, dy: &Tensor, x: &Tensor, rstd: &Tensor) -> Result<Tensor>;
    /// `residual + dx` and `dw` in one pass (see [`Tensor::rms_norm_backward_add`]); `act`:
    /// also the sum in the activation dtype.
    fn rms_norm_backward_add(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        residual: &Tensor,
        act: bool,
    ) -> Result<RmsNormResidualGrads>;
}

/// The result of [`Tensor::rms_norm_backward_add`].
#[derive(Debug, Clone)]
pub struct RmsNormResidualGrads {
    /// `residual + dx` `[.., H]`, f32, written fresh.
    pub sum: Tensor,
    /// `sum` for readers that take activations (GEMMs): when asked for, a copy stored in
    /// the backend's activation dtype (bf16 on a GPU in bf16-activation mode), otherwise
    /// `sum` itself.
    pub act: Tensor,
    /// `dw [H] = Σ_n dy[n]·x[n]·rstd[n]`, f32, written fresh.
    pub d_w: Tensor,
}

/// Checks `x [.., H]`, `w [H]`; returns (H, rows).
fn dims(op: &'static str, x: &Tensor, w_len: Option<&Tensor>) -> Result<(usize, usize)> {
    let h = *x.dims().last().ok_or_else(|| x.rank_error(op, "x", 1))?;
    if let Some(w) = w_len {
        x.same_device(op, w)?;
        if w.dims() != [h] {
            return Err(Error::ShapeMismatch {
                op,
                lhs: x.dims().to_vec(),
                rhs: w.dims().to_vec(),
                rule: "weight must be [H] for x [.., H]",
            });
        }
    }
    Ok((h, x.numel().checked_div(h).unwrap_or(0)))
}

fn check_rstd(op: &'static str, rstd: &Tensor, rows: usize) -> Result<()> {
    if rstd.dims() != [rows] {
        return Err(Error::ShapeMismatch {
            op,
            lhs: rstd.dims().to_vec(),
            rhs: vec![rows],
            rule: "rstd must be [N] (one per row of x)",
        });
    }
    Ok(())
}

impl Tensor {
    /// RMSNorm of `x [.., H]` with weight `w [H]`: returns `(y [.., H], rstd [N])`, `N` the
    /// number of rows. `eps` is added to the mean square (typ. 1e-5 or 1e-6).
    pub fn rms_norm(&self, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rms_norm";
        dims(OP, self, Some(w))?;
        self.backend().rms_norm(self, w, eps)
    }

    /// Input gradient of RMSNorm, written fresh: `dx = rstd·(g − x̂·mean(g⊙x̂))` with
    /// `x̂ = x·rstd`, `g = dy⊙w`. `self` is `dy`.
    pub fn rms_norm_backward_input(&self, x: &Tensor, w: &Tensor, rstd: &Tensor) -> Result<Tensor> {
        const OP: &str = "rms_norm_backward_input";
        self.same_shape(OP, x)?;
        let (_, rows) = dims(OP, x, Some(w))?;
        check_rstd(OP, rstd, rows)?;
        self.backend().rms_norm_backward_input(self, x, w, rstd)
    }

    /// Weight gradient of RMSNorm, written fresh: `dw[j] = Σ_n dy[n,j]·x[n,j]·rstd[n]`
    /// (`[H]`; accumulate into the gradient buffer with `add_assign`). `self` is `dy`.
    pub fn rms_norm_backward_weight(&self, x: &Tensor, rstd: &Tensor) -> Result<Tensor> {
        const OP: &str = "rms_norm_backward_weight";
        self.same_shape(OP, x)?;
        let (_, rows) = dims(OP, x, None)?;
        check_rstd(OP, rstd, rows)?;
        self.backend().rms_norm_backward_weight(self, x, rstd)
    }

    /// RMSNorm's backward folded into the residual stream: `self` is `dy`, `residual` the
    /// gradient the stream already carries to the norm's input `x` (equal shapes). Returns
    /// `sum = residual + dx` with `dx` as in [`Tensor::rms_norm_backward_input`] (f32), the
    /// weight gradient `d_w` as in [`Tensor::rms_norm_backward_weight`], and, when
    /// `act_copy`, `sum` also in the activation dtype (one pass writes both on a GPU; see
    /// [`RmsNormResidualGrads::act`]). On the CPU `sum` holds the bits of
    /// `residual.add(&dy.rms_norm_backward_input(..))`.
    pub fn rms_norm_backward_add(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        residual: &Tensor,
        act_copy: bool,
    ) -> Result<RmsNormResidualGrads> {
        const OP: &str = "rms_norm_backward_add";
        self.same_shape(OP, x)?;
        self.same_shape(OP, residual)?;
        let (_, rows) = dims(OP, x, Some(w))?;
        check_rstd(OP, rstd, rows)?;
        self.backend()
            .rms_norm_backward_add(self, x, w, rstd, residual, act_copy)
    }
}
