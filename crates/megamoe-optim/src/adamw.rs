//! AdamW (Loshchilov & Hutter): Adam moments with decoupled weight decay and bias
//! correction, in PyTorch `torch.optim.AdamW` order:
//!
//! ```text
//! p ← p·(1 − lr·λ)                         (decoupled decay; λ = 0 for norms/biases)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! p ← p − lr/(1 − β1ᵗ) · m / (√(v/(1 − β2ᵗ)) + ε)
//! ```
//!
//! The moments are f32, or bf16 with `optim.moment_dtype = "bf16"` (as DeepSeek-V3 and
//! Megatron-Core's precision-aware optimizer keep them): a bf16 moment is widened to f32,
//! the sequence above runs in f32 exactly as for f32 moments, the parameter's update uses
//! the new f32 moments *before* rounding, and only the stored moments are rounded to
//! nearest even. β1 and β2 are then at most 1 − 2⁻⁸ ([`BF16_MOMENT_MAX_BETA`]): a smaller
//! per-step change falls under bf16's rounding step and the stored moment would stall.

use megamoe_plan::{MomentDtype, OptimPlan, BF16_MOMENT_MAX_BETA};
use megamoe_tensor::{AdamWStep, DType, Tensor};

use crate::error::{OptimError, Result};

/// AdamW hyper-parameters (the learning rate comes per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1 (first moment decay).
    pub beta1: f64,
    /// β2 (second moment decay).
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay λ (applied only to roles with weight decay).
    pub weight_decay: f64,
    /// Element type of the two moments.
    pub moment_dtype: MomentDtype,
}

impl AdamWConfig {
    /// The AdamW settings of a resolved `[optim]` section.
    pub fn from_plan(plan: &OptimPlan) -> AdamWConfig {
        AdamWConfig {
            beta1: plan.beta1,
            beta2: plan.beta2,
            eps: plan.eps,
            weight_decay: plan.weight_decay,
            moment_dtype: plan.moment_dtype,
        }
    }

    /// The tensor dtype of the moments.
    pub fn moment_dtype(&self) -> DType {
        match self.moment_dtype {
            MomentDtype::F32 => DType::F32,
            MomentDtype::Bf16 => DType::BF16,
        }
    }

    /// Checks β ∈ [0, 1), ε > 0, λ ≥ 0 (all finite); β ≤ 1 − 2⁻⁸ with bf16 moments.
    pub fn validate(&self) -> Result<()> {
        let checks: [(&'static str, f64, bool, &'static str); 4] = [
            (
                "optim.beta1",
                self.beta1,
                (0.0..1.0).contains(&self.beta1),
                "must be in [0, 1)",
            ),
            (
                "optim.beta2",
                self.beta2,
                (0.0..1.0).contains(&self.beta2),
                "must be in [0, 1)",
            ),
            ("optim.eps", self.eps, self.eps > 0.0, "must be > 0"),
            (
                "optim.weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "must be >= 0",
            ),
        ];
        for (field, value, ok, rule) in checks {
            if !ok || !value.is_finite() {
                return Err(OptimError::InvalidArgument {
                    field,
                    value: value.to_string(),
                    rule,
                });
            }
        }
        if self.moment_dtype == MomentDtype::Bf16 {
            for (field, beta) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
                if beta > BF16_MOMENT_MAX_BETA {
                    return Err(OptimError::InvalidArgument {
                        field,
                        value: beta.to_string(),
                        rule: "must be <= 0.99609375 (1 - beta >= 2^-8) with optim.moment_dtype = \"bf16\" \
                               (a smaller change falls under bf16's rounding step: the moment stalls)",
                    });
                }
            }
        }
        Ok(())
    }
}

/// Per-parameter AdamW state: the two moments (f32 or bf16), shaped like the parameter.
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// First moment `m` (`exp_avg` in PyTorch).
    pub exp_avg: Tensor,
    /// Second moment `v` (`exp_avg_sq` in PyTorch).
    pub exp_avg_sq: Tensor,
}

impl AdamWState {
    /// Zero f32 moments for a parameter shaped `like`.
    pub fn zeros_like(like: &Tensor) -> Result<AdamWState> {
        AdamWState::zeros_as(like, DType::F32)
    }

    /// Zero moments of `dtype` (f32 or bf16) for a parameter shaped `like`.
    pub fn zeros_as(like: &Tensor, dtype: DType) -> Result<AdamWState> {
        Ok(AdamWState {
            exp_avg: Tensor::zeros(like.dims(), dtype, like.device())?,
            exp_avg_sq: Tensor::zeros(like.dims(), dtype, like.device())?,
        })
    }
}

/// One AdamW update of an f32 parameter `param` with gradient `grad`, updating `state`.
///
/// `t` is the 1-based step count used for bias correction; `decay` says whether weight decay
/// applies to this parameter (see `ParamRole::has_weight_decay`). Returns the new parameter
/// (f32), written fresh: `param` is never modified.
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    state: &mut AdamWState,
    cfg: &AdamWConfig,
    lr: f64,
    t: u64,
    decay: bool,
) -> Result<Tensor> {
    // `p` shares `param`'s buffer, so the op writes a fresh copy.
    let mut p = param.clone();
    adamw_update_in_place(&mut p, grad, state, cfg, lr, t, decay)?;
    Ok(p)
}

/// [`adamw_update`] writing the f32 parameter `param` in place: one fused pass over p, m,
/// v (bit-identical to the unfused scale/axpy/sqrt/div sequence). A parameter whose
/// buffer nobody else holds keeps its address (a captured CUDA graph of the step reads it
/// there); a shared buffer is copied on write.
pub fn adamw_update_in_place(
    param: &mut Tensor,
    grad: &Tensor,
    state: &mut AdamWState,
    cfg: &AdamWConfig,
    lr: f64,
    t: u64,
    decay: bool,
) -> Result<()> {
    param.adamw_step(
        &mut state.exp_avg,
        &mut state.exp_avg_sq,
        grad,
        &AdamWStep {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: if decay { cfg.weight_decay } else { 0.0 },
            t,
        },
    )?;
    Ok(())
}
