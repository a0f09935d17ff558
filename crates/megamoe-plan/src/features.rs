//! Resolution of the adaptive-compute and MTP sections ([gateskip],
//! [flexidepth], [mtp]) plus their small seed formulas.

use crate::error::{PlanError, Result};
use crate::plan::{FlexiDepthPlan, GateSkipPlan, ModelPlan, MtpPlan};
use crate::raw::RawConfig;

/// MTP step weights w_k = β^k / Σ_j β^j for k = 0..K−1 (seed `compute_step_weights`).
pub fn mtp_step_weights(depth: usize, decay: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..depth).map(|k| decay.powi(k as i32)).collect();
    let sum: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / sum).collect()
}

/// FlexiDepth router bottleneck: max(1, d_model / reduction) (seed `flexidepth_router_shape`).
pub fn flexidepth_router_hidden(d_model: usize, reduction: usize) -> usize {
    (d_model / reduction.max(1)).max(1)
}

fn share(field: &'static str, v: f64) -> Result<f64> {
    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
        return Err(PlanError::Invalid {
            field,
            value: v.to_string(),
            rule: "must be a share in [0, 1)",
        });
    }
    Ok(v)
}

fn non_negative(field: &'static str, v: f64) -> Result<f64> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(PlanError::Invalid {
            field,
            value: v.to_string(),
            rule: "must be >= 0",
        });
    }
    Ok(v)
}

pub(crate) fn resolve_gate_skip(raw: &RawConfig) -> Result<Option<GateSkipPlan>> {
    let Some(g) = raw.gateskip.as_ref().filter(|g| g.enabled) else {
        return Ok(None);
    };
    if !g.init_bias.is_finite() {
        return Err(PlanError::Invalid {
            field: "gateskip.init_bias",
            value: g.init_bias.to_string(),
            rule: "must be finite",
        });
    }
    Ok(Some(GateSkipPlan {
        gate: g.gate,
        budget_start: share("gateskip.budget_start", g.budget_start)?,
        budget_end: share("gateskip.budget_end", g.budget_end)?,
        budget_warmup_steps: g.budget_warmup_steps,
        sparsity_weight: non_negative("gateskip.sparsity_weight", g.sparsity_weight)?,
        penalty: g.penalty,
        init_bias: g.init_bias,
        init_std: non_negative("gateskip.init_std", g.init_std)?,
    }))
}

pub(crate) fn resolve_flexi_depth(
    raw: &RawConfig,
    model: &ModelPlan,
) -> Result<Option<FlexiDepthPlan>> {
    let Some(f) = raw.flexidepth.as_ref().filter(|f| f.enabled) else {
        return Ok(None);
    };
    let adaptive = f.adaptive_layers.unwrap_or((model.n_layers / 2).max(1));
    // Layer 0 is never skipped, so at most n_layers − 1 adaptive layers.
    if adaptive == 0 || adaptive >= model.n_layers {
        return Err(PlanError::Invalid {
            field: "flexidepth.adaptive_layers",
            value: adaptive.to_string(),
            rule: "must be in 1..model.n_layers (layer 0 is never skipped)",
        });
    }
    if f.reduction == 0 {
        return Err(PlanError::Invalid {
            field: "flexidepth.reduction",
            value: "0".into(),
            rule: "must be >= 1",
        });
    }
    if f.adapter_reduction == 0 || f.adapter_reduction > model.ffn_hidden {
        return Err(PlanError::Invalid {
            field: "flexidepth.adapter_reduction",
            value: f.adapter_reduction.to_string(),
            rule:
                "must be in 1..=model.ffn_hidden (adapter hidden = ffn_hidden / adapter_reduction)",
        });
    }
    if !(f.threshold.is_finite() && f.threshold > 0.0 && f.threshold < 1.0) {
        return Err(PlanError::Invalid {
            field: "flexidepth.threshold",
            value: f.threshold.to_string(),
            rule: "must be in (0, 1)",
        });
    }
    Ok(Some(FlexiDepthPlan {
        adaptive_layers: adaptive,
        first_adaptive_layer: model.n_layers - adaptive,
        router_hidden: flexidepth_router_hidden(model.d_model, f.reduction),
        threshold: f.threshold,
        skip_loss_weight: non_negative("flexidepth.skip_loss_weight", f.skip_loss_weight)?,
        adapter_hidden: model.ffn_hidden / f.adapter_reduction,
        router_order: f.router_order,
    }))
}

pub(crate) fn resolve_mtp(raw: &RawConfig, model: &ModelPlan) -> Result<Option<MtpPlan>> {
    let Some(m) = raw.mtp.as_ref().filter(|m| m.depth > 0) else {
        return Ok(None);
    };
    if m.depth >= model.seq_len {
        return Err(PlanError::Invalid {
            field: "mtp.depth",
            value: m.depth.to_string(),
            rule: "must be < model.seq_len (each depth shifts targets by one more token)",
        });
    }
    if !(m.decay.is_finite() && m.decay > 0.0 && m.decay <= 1.0) {
        return Err(PlanError::Invalid {
            field: "mtp.decay",
            value: m.decay.to_string(),
            rule: "must be in (0, 1]",
        });
    }
    Ok(Some(MtpPlan {
        depth: m.depth,
        mode: m.mode,
        decay: m.decay,
        loss_weight: non_negative("mtp.loss_weight", m.loss_weight)?,
        concat_order: m.concat_order,
        step_weights: mtp_step_weights(m.depth, m.decay),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtp_step_weights_match_seed() {
        // Seed: K=3, β=0.6 → [1, .6, .36]/1.96 = [0.5102, 0.3061, 0.1837].
        let w = mtp_step_weights(3, 0.6);
        for (got, want) in w.iter().zip([0.5102, 0.3061, 0.1837]) {
            assert!((got - want).abs() < 5e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn flexidepth_router_hidden_has_floor_one() {
        assert_eq!(flexidepth_router_hidden(4096, 16), 256);
        assert_eq!(flexidepth_router_hidden(8, 16), 1);
    }
}
