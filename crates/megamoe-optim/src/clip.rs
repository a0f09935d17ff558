//! Global gradient-norm clipping (PyTorch `clip_grad_norm_` semantics).
//!
//! `norm = √(Σ_params Σ g²)` over every gradient (f64 accumulation); if `norm > max_norm`
//! every gradient is multiplied by `max_norm / (norm + 1e-6)`. A non-finite norm is reported
//! (`finite = false`) and the gradients are left untouched, so the trainer's NaN/Inf guard
//! sees it and can skip the step.

use megamoe_tensor::Tensor;

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

/// The global L2 norm of every gradient the visitor yields.
///
/// SYNC: reads one scalar per gradient to the host (the norm is a host value for metrics).
pub fn global_grad_norm(visit_grads: &mut Visitor<'_>) -> Result<f64> {
    let mut total = 0.0f64;
    let mut err: Option<OptimError> = None;
    visit_grads(&mut |_, g, _| {
        if err.is_some() {
            return;
        }
        // SYNC: one f32 per tensor; the sum over tensors runs in f64 on the host.
        match g.sum_squares().and_then(|s| s.to_scalar_f32()) {
            Ok(s) => total += s as f64,
            Err(e) => err = Some(e.into()),
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(total.sqrt()),
    }
}

/// Clips the gradients in place to a global norm of `max_norm` (`None` = only measure).
/// Returns the pre-clip norm; a non-finite norm is returned with `finite = false` and the
/// gradients are not scaled.
pub fn clip_grad_norm(
    visit_grads: &mut VisitorMut<'_>,
    max_norm: Option<f64>,
) -> Result<ClipReport> {
    if let Some(m) = max_norm {
        if !(m.is_finite() && m > 0.0) {
            return Err(OptimError::InvalidArgument {
                field: "optim.grad_clip",
                value: m.to_string(),
                rule: "must be finite and > 0 (use None for no clipping)",
            });
        }
    }
    let norm = global_grad_norm(&mut |f| visit_grads(&mut |n, g, r| f(n, g, r)))?;
    let finite = norm.is_finite();
    let mut report = ClipReport {
        norm,
        finite,
        clipped: false,
        scale: 1.0,
    };
    let Some(max_norm) = max_norm else {
        return Ok(report);
    };
    if !finite || norm <= max_norm {
        return Ok(report);
    }
    let scale = max_norm / (norm + 1e-6);
    let mut err: Option<OptimError> = None;
    visit_grads(&mut |_, g: &mut Tensor, _| {
        if err.is_some() {
            return;
        }
        match g.scale(scale as f32) {
            Ok(s) => *g = s,
            Err(e) => err = Some(e.into()),
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    report.clipped = true;
    report.scale = scale;
    Ok(report)
}
