//! Layer configs, built from the validated [`MoePlan`] (never from raw strings).
//!
//! [`MoeConfig`] is the whole layer; it holds one plain, validated config per part:
//! [`RouterConfig`], [`RoutedExpertsConfig`], [`SharedExpertsConfig`], plus capacity, losses
//! and the dispatch fast paths. Capacity `C` is not stored: it depends on the tokens of
//! each call and only [`megamoe_plan::expert_capacity`] computes it
//! ([`MoeConfig::capacity_for`]).

use megamoe_plan::{
    expert_capacity, Activation, AuxLossKind, Capacity, DropPolicy, GroupRoutingPlan, MoePlan,
    NullSlotPlan, Plan, ScoreFn,
};

use crate::dispatch::DispatchFastPaths;
use crate::error::{Error, Result};

/// The router: gating (logits) and routing (scores, selection, gates).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// H: model width.
    pub d_model: usize,
    /// E: routed experts.
    pub num_routed_experts: usize,
    /// k: experts per token (without null slots).
    pub top_k: usize,
    /// softmax or sigmoid scores.
    pub score_fn: ScoreFn,
    /// softmax over the whole pool before top-k (true) or over the chosen logits (false).
    pub pre_softmax: bool,
    /// Renormalise the chosen real gates to sum to 1 (+1e-20).
    pub normalize: bool,
    /// Gate multiplier after normalisation.
    pub route_scale: f32,
    /// Group-limited routing; `None` = off.
    pub group_routing: Option<GroupRoutingPlan>,
    /// Selection uses the expert-bias buffer (aux-loss-free balancing).
    pub expert_bias: bool,
    /// Null-slot routing; `None` = off.
    pub null_slots: Option<NullSlotPlan>,
}

impl RouterConfig {
    /// Null copies in the pool (0 when null slots are off).
    pub fn num_null_slots(&self) -> usize {
        self.null_slots.map_or(0, |n| n.n_null_copies)
    }

    /// Ep = E + n_null: router slots scored per token.
    pub fn pool_size(&self) -> usize {
        self.num_routed_experts + self.num_null_slots()
    }

    /// Slots each token picks: k, or k_max with null slots.
    pub fn slots_per_token(&self) -> usize {
        self.null_slots.map_or(self.top_k, |n| n.k_max)
    }
}

/// The routed expert bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutedExpertsConfig {
    /// E.
    pub num_routed_experts: usize,
    /// H.
    pub d_model: usize,
    /// F: hidden width of one routed expert.
    pub hidden: usize,
    /// Activation (swiglu has a gate_proj).
    pub activation: Activation,
}

/// The shared-expert path: ONE dense FFN of width n_s · shared_expert_hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedExpertsConfig {
    /// n_s (only its product with the per-expert width matters for compute).
    pub num_shared_experts: usize,
    /// H.
    pub d_model: usize,
    /// Fs = n_s · shared_expert_hidden.
    pub hidden: usize,
    /// Same activation as the routed experts.
    pub activation: Activation,
    /// Learned sigmoid gate σ(x · w_gᵀ), w_g [1, H].
    pub gate: bool,
}

/// The whole MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// H.
    pub d_model: usize,
    /// Tokens per sequence; T must be a multiple of it (seq_aux segments).
    pub seq_len: usize,
    /// Router.
    pub router: RouterConfig,
    /// Routed experts.
    pub routed_experts: RoutedExpertsConfig,
    /// Dropless or `Factor(cf)`: C = ceil(T·k / E · cf).
    pub capacity: Capacity,
    /// Which assignments survive over capacity.
    pub drop_policy: DropPolicy,
    /// Run every expert on exactly C rows (static shapes; values unchanged).
    pub pad_to_capacity: bool,
    /// Shared experts; `None` = off.
    pub shared_experts: Option<SharedExpertsConfig>,
    /// Balancing loss kind.
    pub aux_loss: AuxLossKind,
    /// Its weight (default 0.01).
    pub aux_loss_weight: f64,
    /// z-loss weight (default 1e-3).
    pub z_loss_weight: f64,
    /// CPU dispatch fast paths (seed `moe_dispatch_fast_paths`).
    pub fast_paths: DispatchFastPaths,
}

impl MoeConfig {
    /// The layer's slice of a validated plan. `d_model` and `seq_len` come from `[model]`.
    pub fn from_moe_plan(d_model: usize, seq_len: usize, moe: &MoePlan) -> Result<MoeConfig> {
        let router = RouterConfig {
            d_model,
            num_routed_experts: moe.routed_experts,
            top_k: moe.top_k,
            score_fn: moe.score_fn,
            pre_softmax: moe.pre_softmax,
            normalize: moe.normalize,
            route_scale: moe.route_scale as f32,
            group_routing: moe.group_routing,
            expert_bias: moe.expert_bias_rate.is_some(),
            null_slots: moe.null_slots,
        };
        let cfg = MoeConfig {
            d_model,
            seq_len,
            router,
            routed_experts: RoutedExpertsConfig {
                num_routed_experts: moe.routed_experts,
                d_model,
                hidden: moe.expert_hidden,
                activation: moe.activation,
            },
            capacity: moe.capacity,
            drop_policy: moe.drop_policy,
            pad_to_capacity: moe.pad_to_capacity,
            shared_experts: moe.shared.map(|s| SharedExpertsConfig {
                num_shared_experts: s.experts,
                d_model,
                hidden: s.total_hidden,
                activation: moe.activation,
                gate: s.gate,
            }),
            aux_loss: moe.aux_loss,
            aux_loss_weight: moe.aux_loss_weight,
            z_loss_weight: moe.z_loss_weight,
            fast_paths: DispatchFastPaths::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The MoE layer of a resolved run plan (error if the model has none).
    pub fn from_plan(plan: &Plan) -> Result<MoeConfig> {
        let moe = plan.moe.as_ref().ok_or(Error::NoMoeSection)?;
        MoeConfig::from_moe_plan(plan.model.d_model, plan.model.seq_len, moe)
    }

    /// Parses a run config (TOML), resolves it with [`Plan::resolve`] and takes its MoE layer.
    pub fn from_toml_str(text: &str) -> Result<MoeConfig> {
        let plan = Plan::from_toml_str(text, &[], None)?;
        MoeConfig::from_plan(&plan)
    }

    /// Checks the rules that involve more than one part (the plan checked each field).
    pub fn validate(&self) -> Result<()> {
        let r = &self.router;
        let bad = |field, value: String, rule| Err(Error::Config { field, value, rule });
        if self.d_model == 0 {
            return bad("model.d_model", "0".into(), "must be >= 1");
        }
        if self.seq_len == 0 {
            return bad("model.seq_len", "0".into(), "must be >= 1");
        }
        if r.num_routed_experts == 0 {
            return bad("moe.routed_experts", "0".into(), "must be >= 1");
        }
        if r.top_k == 0 || r.top_k > r.num_routed_experts {
            return bad(
                "moe.top_k",
                r.top_k.to_string(),
                "must be in 1..=moe.routed_experts",
            );
        }
        if r.null_slots.is_some() && r.group_routing.is_some() {
            return bad(
                "moe.null_rho",
                format!("{:?}", r.null_slots.map(|n| n.null_rho)),
                "null slots cannot be combined with moe.n_groups > 1",
            );
        }
        if !(r.route_scale.is_finite() && r.route_scale > 0.0) {
            return bad("moe.route_scale", r.route_scale.to_string(), "must be > 0");
        }
        if self.routed_experts.hidden == 0 {
            return bad("moe.expert_hidden", "0".into(), "must be >= 1");
        }
        if self.pad_to_capacity && self.capacity == Capacity::Dropless {
            return bad(
                "moe.pad_to_capacity",
                "true".into(),
                "needs moe.capacity_factor",
            );
        }
        Ok(())
    }

    /// Capacity C for a call with `tokens` tokens (`None` when dropless). k = top_k, not k_max.
    pub fn capacity_for(&self, tokens: usize) -> Option<usize> {
        match self.capacity {
            Capacity::Dropless => None,
            Capacity::Factor(f) => Some(expert_capacity(
                tokens,
                self.router.top_k,
                self.router.num_routed_experts,
                f,
            )),
        }
    }
}
