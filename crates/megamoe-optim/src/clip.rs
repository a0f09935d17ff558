//! Global gradient-norm clipping (PyTorch `clip_grad_norm_` semantics).
//!
//! `norm = √(Σ_params Σ g²)` over every gradient (f64 accumulation); if `norm > max_norm`
//! every gradient is multiplied by `max_norm / (norm + 1e-6)`. A non-finite norm is reported
//! (`finite = false`) and the gradients are left untouched, so the trainer's NaN/Inf guard
//! sees it and can skip the step.

use megamoe_tensor::{DType, Tensor};

use crate::error::{OptimError, Result};
use crate::params::{Visitor, VisitorMut};

/// What clipping saw and did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipReport {
    /// Global gradient norm before clipping (may be NaN or ∞).
    pub norm: f64,
    /// Whether the norm is finite. When false nothing was scaled.
    pub finite: bool,
    /// Whether the gradients were scaled down.
    pub clipped: bool,
    /// The factor applied (1.0 when not clipped).
    pub scale: f64,
}

/// The global L2 norm of every gradient the visitor yields, as a rank-0 tensor on the
/// device: per-gradient Σ g² (f64 inside each tensor), summed over tensors in f64. No host
/// read.
pub fn global_grad_norm_tensor(visit_grads: &mut Visitor<'_>) -> Result<Tensor> {
    let mut parts: Vec<Tensor> = Vec::new();
    let mut err: Option<OptimError> = None;
    visit_grads(&mut |_, g, _| {
        if err.is_some() {
            return;
        }
        match g.sum_squares().and_then(|s| s.reshape([1])) {
            Ok(s) => parts.push(s),
            Err(e) => err = Some(e.into()),
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    if parts.is_empty() {
        return Ok(Tensor::scalar(0.0, Default::default())?);
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok(Tensor::cat(&refs, 0)?.sum_all()?.sqrt()?)
}

/// The global L2 norm of every gradient the visitor yields.
///
/// SYNC: one host read (the norm), however many gradients.
pub fn global_grad_norm(visit_grads: &mut Visitor<'_>) -> Result<f64> {
    // SYNC: the norm is a host value for metrics and the NaN/Inf guard.
    Ok(global_grad_norm_tensor(visit_grads)?.to_scalar_f32()? as f64)
}

/// Clips the gradients in place to a global norm of `max_norm` (`None` = only measure).
/// Returns the pre-clip norm; a non-finite norm is returned with `finite = false` and the
/// gradients are not scaled. The factor is computed and applied on the device.
///
/// SYNC: one host read (the norm for the report), however many gradients.
pub fn clip_grad_norm(
    visit_grads: &mut VisitorMut<'_>,
    max_norm: Option<f64>,
) -> Result<ClipReport> {
    let norm_t = clip_grad_norm_tensor(visit_grads, max_norm)?;
    // SYNC: the norm is a host value for metrics and the NaN/Inf guard.
    let norm = norm_t.to_scalar_f32()? as f64;
    Ok(ClipReport::from_norm(norm, max_norm))
}

/// [`clip_grad_norm`]'s device work: the pre-clip norm as a rank-0 device tensor, the
/// gradients scaled in place where it exceeds `max_norm` (and is finite). No host read, so
/// it can be captured in a CUDA graph; [`ClipReport::from_norm`] makes the report once the
/// norm is read.
pub fn clip_grad_norm_tensor(
    visit_grads: &mut VisitorMut<'_>,
    max_norm: Option<f64>,
) -> Result<Tensor> {
    check_max_norm(max_norm)?;
    let norm_t = global_grad_norm_tensor(&mut |f| visit_grads(&mut |n, g, r| f(n, g, r)))?;
    if let Some(max_norm) = max_norm {
        let factor = clip_factor(&norm_t, max_norm)?;
        let mut err: Option<OptimError> = None;
        visit_grads(&mut |_, g: &mut Tensor, _| {
            if err.is_none() {
                if let Err(e) = g.scale_by_assign(&factor) {
                    err = Some(e.into());
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
    }
    Ok(norm_t)
}

/// Checks a clipping bound: finite and > 0 (`None`: no clipping).
pub fn check_max_norm(max_norm: Option<f64>) -> Result<()> {
    match max_norm {
        Some(m) if !(m.is_finite() && m > 0.0) => Err(OptimError::InvalidArgument {
            field: "optim.grad_clip",
            value: m.to_string(),
            rule: "must be finite and > 0 (use None for no clipping)",
        }),
        _ => Ok(()),
    }
}

impl ClipReport {
    /// The report of a clip whose pre-clip norm was `norm` (what [`clip_grad_norm_tensor`]
    /// did on the device).
    pub fn from_norm(norm: f64, max_norm: Option<f64>) -> ClipReport {
        let finite = norm.is_finite();
        let clipped = finite && max_norm.is_some_and(|m| norm > m);
        ClipReport {
            norm,
            finite,
            clipped,
            scale: match max_norm {
                Some(m) if clipped => (m as f32 / (norm as f32 + 1e-6)) as f64,
                _ => 1.0,
            },
        }
    }
}

/// The clip factor on the device: `max_norm / (norm + 1e-6)` where `norm > max_norm` and
/// the norm is finite, else 1 (rank-0 f32).
pub fn clip_factor(norm: &Tensor, max_norm: f64) -> Result<Tensor> {
    let m = max_norm as f32;
    // over = [norm > m] − [norm = ∞]: 1 exactly when finite and above the bound (NaN: 0).
    let over = norm.gt_scalar(m)?.sub(&norm.eq_scalar(f32::INFINITY)?)?;
    let ratio = norm.add_scalar(1e-6)?.recip()?.scale(m)?;
    Ok(over.where_cond(
        &ratio,
        &Tensor::ones(norm.dims(), DType::F32, norm.device())?,
    )?)
}
