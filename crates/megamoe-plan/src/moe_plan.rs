//! `[moe]` resolved: routing, capacity, null slots, group routing, shared
//! experts and the per-micro-batch routing numbers of one rank.

use crate::capacity::{expert_capacity, routed_tokens_per_step};
use crate::error::{PlanError, Result};
use crate::group_routing::{group_routing_plan, GroupRoutingPlan};
use crate::modes::{Activation, AuxLossKind, Capacity, DropPolicy, ScoreFn};
use crate::null_slot::{null_slot_plan, NullSlotPlan};
use crate::plan::{
    divisible, finite_in, positive, BatchPlan, ModelPlan, ParallelPlan, PlanWarning,
};
use crate::raw::RawConfig;
use serde::{Deserialize, Serialize};

/// `[moe]`, resolved (present only when routed_experts ≥ 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoePlan {
    /// E.
    pub routed_experts: usize,
    /// k.
    pub top_k: usize,
    /// Routed expert width h.
    pub expert_hidden: usize,
    /// Expert activation.
    pub activation: Activation,
    /// Score function.
    pub score_fn: ScoreFn,
    /// Softmax over all experts before top-k.
    pub pre_softmax: bool,
    /// Renormalise chosen gates (default resolved as in step 6 of tools/reference/moe_reference.py).
    pub normalize: bool,
    /// Gate multiplier.
    pub route_scale: f64,
    /// Group-limited routing; `None` when n_groups = 1.
    pub group_routing: Option<GroupRoutingPlan>,
    /// Aux-loss-free bias update rate γ; `None` when moe.expert_bias = false.
    pub expert_bias_rate: Option<f64>,
    /// Null slots; `None` when null_rho is absent or 1.
    pub null_slots: Option<NullSlotPlan>,
    /// Dropless or capacity factor.
    pub capacity: Capacity,
    /// Drop policy over capacity.
    pub drop_policy: DropPolicy,
    /// Static expert buffers of exactly `capacity` rows.
    pub pad_to_capacity: bool,
    /// Shared experts; `None` when shared_experts = 0.
    pub shared: Option<SharedExpertsPlan>,
    /// Balancing loss.
    pub aux_loss: AuxLossKind,
    /// Its weight.
    pub aux_loss_weight: f64,
    /// z-loss weight.
    pub z_loss_weight: f64,
    /// moe.layer_freq.
    pub layer_freq: usize,
    /// moe.first_dense_layers.
    pub first_dense_layers: usize,
    /// Indices of MoE layers (l ≥ first_dense_layers and l % layer_freq == 0).
    pub moe_layers: Vec<usize>,
    /// E / ep.
    pub experts_per_ep_rank: usize,
    /// Per-micro-batch routing numbers of one rank.
    pub routing: RoutingPlan,
}

/// The shared-expert path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedExpertsPlan {
    /// n_s.
    pub experts: usize,
    /// Width of one shared expert.
    pub hidden_per_expert: usize,
    /// n_s · hidden_per_expert: the width of the one fused dense FFN.
    pub total_hidden: usize,
    /// Learned sigmoid gate.
    pub gate: bool,
}

/// Routing numbers for one rank's micro-batch at one MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingPlan {
    /// T: tokens of one rank's micro-batch (micro_batch_size · seq_len / cp).
    pub tokens: usize,
    /// T·k assignments emitted (k = top_k; with null slots, real assignments average T·k).
    pub routed_assignments: usize,
    /// Slots a token picks: k, or k_max with null slots.
    pub slots_per_token: usize,
    /// Capacity C per routed expert per micro-batch; `None` when dropless.
    pub capacity: Option<usize>,
    /// Rows each EP rank's experts receive when routing is balanced: T·k.
    pub expected_rows_per_ep_rank: usize,
    /// Upper bound of received rows per EP rank: capacity mode El·ep·C; dropless
    /// ep·T·min(slots, El) (every peer sends all its tokens here).
    pub worst_case_rows_per_ep_rank: usize,
}

pub(crate) fn resolve_moe(
    raw: &RawConfig,
    model: &ModelPlan,
    par: &ParallelPlan,
    batch: &BatchPlan,
    warnings: &mut Vec<PlanWarning>,
) -> Result<Option<MoePlan>> {
    let Some(s) = raw.moe.as_ref().filter(|s| s.routed_experts > 0) else {
        return Ok(None);
    };
    let e = s.routed_experts;
    check_expert_split(raw, par)?;
    let expert_hidden = positive(
        "moe.expert_hidden",
        s.expert_hidden.unwrap_or(model.ffn_hidden),
    )?;
    // Routed experts are not split over TP (each TP rank runs its EP rank's experts
    // whole), so moe.expert_hidden needs no divisibility by parallel.tp.
    finite_in(
        "moe.route_scale",
        s.route_scale,
        s.route_scale > 0.0,
        "must be > 0",
    )?;
    finite_in(
        "moe.bias_update_rate",
        s.bias_update_rate,
        s.bias_update_rate >= 0.0,
        "must be >= 0",
    )?;
    finite_in(
        "moe.aux_loss_weight",
        s.aux_loss_weight,
        s.aux_loss_weight >= 0.0,
        "must be >= 0",
    )?;
    finite_in(
        "moe.z_loss_weight",
        s.z_loss_weight,
        s.z_loss_weight >= 0.0,
        "must be >= 0",
    )?;
    let topk_groups = s.topk_groups.unwrap_or(s.n_groups);
    let group = group_routing_plan(e, s.n_groups, topk_groups, s.top_k)?;
    let group_routing = (s.n_groups > 1).then_some(group);
    let null_slots = match s.null_rho {
        None => None,
        Some(rho) => {
            let plan = null_slot_plan(e, s.top_k, rho)?;
            if rho < 1.0 {
                if let Some(g) = group_routing {
                    return Err(PlanError::GroupRoutingWithNullSlots {
                        n_groups: g.n_groups,
                        null_rho: rho,
                    });
                }
                Some(plan)
            } else {
                None
            }
        }
    };
    let capacity = match s.capacity_factor {
        None => Capacity::Dropless,
        Some(f) => Capacity::Factor(finite_in(
            "moe.capacity_factor",
            f,
            f > 0.0,
            "must be > 0 (omit it for dropless)",
        )?),
    };
    if s.pad_to_capacity && capacity == Capacity::Dropless {
        return Err(PlanError::Invalid {
            field: "moe.pad_to_capacity",
            value: "true".into(),
            rule: "needs moe.capacity_factor (dropless buffers have no fixed size)",
        });
    }
    let shared = if s.shared_experts == 0 {
        if s.shared_expert_gate {
            return Err(PlanError::Invalid {
                field: "moe.shared_expert_gate",
                value: "true".into(),
                rule: "needs moe.shared_experts >= 1",
            });
        }
        None
    } else {
        let per = positive(
            "moe.shared_expert_hidden",
            s.shared_expert_hidden.unwrap_or(expert_hidden),
        )?;
        let total = crate::plan::checked_product(
            "shared expert width",
            &[
                ("moe.shared_experts", s.shared_experts),
                ("moe.shared_expert_hidden", per),
            ],
        )?;
        if par.tp > 1 {
            divisible(
                "moe.shared_experts x shared_expert_hidden",
                total,
                "parallel.tp",
                par.tp,
            )?;
        }
        Some(SharedExpertsPlan {
            experts: s.shared_experts,
            hidden_per_expert: per,
            total_hidden: total,
            gate: s.shared_expert_gate,
        })
    };
    let layer_freq = positive("moe.layer_freq", s.layer_freq)?;
    let moe_layers: Vec<usize> = (0..model.n_layers)
        .filter(|&l| l >= s.first_dense_layers && l % layer_freq == 0)
        .collect();
    if moe_layers.is_empty() {
        return Err(PlanError::NoMoeLayers {
            n_layers: model.n_layers,
            first_dense_layers: s.first_dense_layers,
            layer_freq,
        });
    }
    let normalize = s.normalize.unwrap_or(match s.score_fn {
        ScoreFn::Sigmoid => true,
        ScoreFn::Softmax => s.pre_softmax && s.top_k > 1,
    });
    let experts_per_ep_rank = e / par.ep;
    let t = batch.tokens_per_micro_batch;
    let slots = null_slots.map_or(s.top_k, |n| n.k_max);
    let cap = match capacity {
        Capacity::Dropless => None,
        Capacity::Factor(f) => Some(expert_capacity(t, s.top_k, e, f)),
    };
    if let Some(c) = cap {
        if c == 0 {
            warnings.push(PlanWarning::CapacityBelowTopK { capacity: c });
        }
    }
    let worst = match cap {
        Some(c) => e.saturating_mul(c),
        None => par
            .ep
            .saturating_mul(t)
            .saturating_mul(slots.min(experts_per_ep_rank)),
    };
    let routing = RoutingPlan {
        tokens: t,
        routed_assignments: routed_tokens_per_step(t, s.top_k),
        slots_per_token: slots,
        capacity: cap,
        expected_rows_per_ep_rank: routed_tokens_per_step(t, s.top_k),
        worst_case_rows_per_ep_rank: worst,
    };
    Ok(Some(MoePlan {
        routed_experts: e,
        top_k: s.top_k,
        expert_hidden,
        activation: s.activation,
        score_fn: s.score_fn,
        pre_softmax: s.pre_softmax,
        normalize,
        route_scale: s.route_scale,
        group_routing,
        expert_bias_rate: s.expert_bias.then_some(s.bias_update_rate),
        null_slots,
        capacity,
        drop_policy: s.drop_policy,
        pad_to_capacity: s.pad_to_capacity,
        shared,
        aux_loss: s.aux_loss,
        aux_loss_weight: s.aux_loss_weight,
        z_loss_weight: s.z_loss_weight,
        layer_freq,
        first_dense_layers: s.first_dense_layers,
        moe_layers,
        experts_per_ep_rank,
        routing,
    }))
}

impl MoePlan {
    /// Whether layer `l` is one of [`MoePlan::moe_layers`], in constant time
    /// (l ≥ first_dense_layers, l a multiple of layer_freq, within the model).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        l >= self.first_dense_layers
            && l.is_multiple_of(self.layer_freq)
            && self.moe_layers.last().is_some_and(|&last| l <= last)
    }
}

/// The expert-count rules that do not depend on the batch: 1 ≤ top_k ≤ E,
/// E % ep == 0, and ep > 1 only with MoE. Checked before the batch arithmetic
/// so a bad expert split is reported as such.
pub(crate) fn check_expert_split(raw: &RawConfig, par: &ParallelPlan) -> Result<()> {
    let Some(s) = raw.moe.as_ref().filter(|s| s.routed_experts > 0) else {
        if par.ep > 1 {
            return Err(PlanError::EpWithoutMoe { ep: par.ep });
        }
        return Ok(());
    };
    let e = s.routed_experts;
    if s.top_k == 0 || s.top_k > e {
        return Err(PlanError::TopKExceedsExperts {
            top_k: s.top_k,
            routed_experts: e,
        });
    }
    if !e.is_multiple_of(par.ep) {
        return Err(PlanError::ExpertsNotDivisibleByEp {
            routed_experts: e,
            ep: par.ep,
        });
    }
    Ok(())
}
