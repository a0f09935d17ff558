//! Learning-rate schedules: linear warmup, then cosine / linear decay to `min_lr`, or constant.
//!
//! With `w` warmup steps, `T` total steps and the 0-based index `s` of the step about to run
//! (llm.c's convention):
//!
//! ```text
//! s < w:   lr(s) = peak · (s + 1) / w
//! s ≥ w:   r = clamp((s − w) / (T − w), 0, 1)
//!          cosine:   min + ½(1 + cos πr)(peak − min)
//!          linear:   peak − r(peak − min)
//!          constant: peak
//! ```
//! so the warmup ends at `lr(w − 1) = peak`, the decay midpoint is `(peak + min)/2` and
//! `lr(T) = min` (`T ≤ w` means no decay: `peak`). Muon's learning rate follows the same
//! curve scaled by `muon.lr / lr` (see [`Schedule::muon_lr`]).

use megamoe_plan::{LrSchedule, OptimPlan};

use crate::error::{OptimError, Result};

/// A learning-rate curve over a fixed number of steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Decay shape after warmup.
    pub kind: LrSchedule,
    /// Peak (AdamW) learning rate.
    pub peak: f64,
    /// Final learning rate of the decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Total optimizer steps of the run (`train.steps`).
    pub total_steps: usize,
    /// Muon peak learning rate (`None` without Muon).
    pub muon_peak: Option<f64>,
}

impl Schedule {
    /// The schedule of a resolved `[optim]` section for a run of `total_steps` steps.
    pub fn from_plan(plan: &OptimPlan, total_steps: usize) -> Result<Schedule> {
        Schedule::new(
            plan.lr_schedule,
            plan.lr,
            plan.min_lr,
            plan.warmup_steps,
            total_steps,
        )
        .map(|s| Schedule {
            muon_peak: plan.muon.map(|m| m.lr),
            ..s
        })
    }

    /// A schedule from its numbers; checks `0 ≤ min_lr ≤ peak`, `peak > 0`, all finite.
    pub fn new(
        kind: LrSchedule,
        peak: f64,
        min_lr: f64,
        warmup_steps: usize,
        total_steps: usize,
    ) -> Result<Schedule> {
        if !(peak.is_finite() && peak > 0.0) {
            return Err(OptimError::InvalidArgument {
                field: "optim.lr",
                value: peak.to_string(),
                rule: "must be finite and > 0",
            });
        }
        if !(min_lr.is_finite() && (0.0..=peak).contains(&min_lr)) {
            return Err(OptimError::InvalidArgument {
                field: "optim.min_lr",
                value: min_lr.to_string(),
                rule: "must be in [0, optim.lr]",
            });
        }
        Ok(Schedule {
            kind,
            peak,
            min_lr,
            warmup_steps,
            total_steps,
            muon_peak: None,
        })
    }

    /// The peak-relative factor `lr(step) / peak` ∈ [0, 1].
    pub fn factor(&self, step: usize) -> f64 {
        self.lr(step) / self.peak
    }

    /// The AdamW learning rate for the 0-based step `step` (formula in the module docs).
    pub fn lr(&self, step: usize) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if step < w {
            return self.peak * (step + 1) as f64 / w as f64;
        }
        if t <= w {
            return self.peak;
        }
        let r = ((step - w) as f64 / (t - w) as f64).clamp(0.0, 1.0);
        match self.kind {
            LrSchedule::Cosine => {
                self.min_lr
                    + 0.5 * (1.0 + (std::f64::consts::PI * r).cos()) * (self.peak - self.min_lr)
            }
            LrSchedule::Linear => self.peak - r * (self.peak - self.min_lr),
            LrSchedule::Constant => self.peak,
        }
    }

    /// Muon's learning rate at `step`: `muon_peak · lr(step) / peak` (None without Muon).
    pub fn muon_lr(&self, step: usize) -> Option<f64> {
        self.muon_peak.map(|m| m * self.factor(step))
    }
}
