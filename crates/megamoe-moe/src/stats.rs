//! Routing statistics of one call: tokens per expert, dropped assignments, null share,
//! mean real experts per token, max/mean load, the kept expert of every (token, slot)
//! and the mean shared-expert gate.
//!
//! The layer returns [`MoeStats`] as device tensors (no sync in forward beyond the one
//! dispatch already makes); [`MoeStats::to_host`] reads them once into [`RoutingStats`].
//! [`MoeStats::token_experts`] stays on the device: callers that need it (expert load by
//! data domain) read it themselves.

use megamoe_tensor::{DType, Tensor};

use crate::error::Result;

/// Per-call routing counts, on the device.
#[derive(Debug, Clone)]
pub struct MoeStats {
    /// `[1, Ep]` f32: picks per pool slot before capacity (real experts, then null copies).
    pub picks_per_slot: Tensor,
    /// `[E]` i32: assignments kept per routed expert after capacity.
    pub tokens_per_expert: Tensor,
    /// E.
    pub num_routed_experts: usize,
    /// N tokens of the call.
    pub tokens: usize,
    /// K slots per token.
    pub slots_per_token: usize,
    /// `[N, K]` i32: the routed expert each (token, slot) assignment went to after
    /// capacity, `-1` for a null slot or a dropped assignment (see [`kept_expert_ids`]).
    /// Row `n` is token `n` of the call's input; the non-negative entries of expert `e`
    /// number `tokens_per_expert[e]`.
    pub token_experts: Tensor,
    /// Rank-0 f32 mean over the call's tokens of the shared-expert gate `σ(x · w_gᵀ)`;
    /// `Some` iff the layer has shared experts with `moe.shared_expert_gate = true`.
    pub shared_gate_mean: Option<Tensor>,
}

/// `[N, K]` i32 kept expert per assignment: `slots[n, k]` where `keep[n, k] = 1`, else
/// `-1` (`slots` `[N, K]` i32 pool indices, `keep` `[N, K]` f32 1/0 from capacity, which
/// is 0 on null slots). Computed on the device as `(slots + 1) · keep − 1`, exact for
/// indices below 2^24.
pub fn kept_expert_ids(slots: &Tensor, keep: &Tensor) -> Result<Tensor> {
    Ok(slots
        .to_dtype(DType::F32)?
        .add_scalar(1.0)?
        .mul(keep)?
        .add_scalar(-1.0)?
        .to_dtype(DType::I32)?)
}

/// The same counts on the host, with the derived numbers the step log prints.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingStats {
    /// Assignments kept per routed expert.
    pub tokens_per_expert: Vec<usize>,
    /// Real-expert assignments dropped by capacity.
    pub dropped: usize,
    /// Real-expert picks before capacity.
    pub real_picks: usize,
    /// Null-slot picks.
    pub null_picks: usize,
    /// null_picks / (N·K).
    pub null_share: f64,
    /// real_picks / N (before capacity: the router's choice).
    pub mean_real_experts_per_token: f64,
    /// max / mean of tokens_per_expert (1.0 = perfectly balanced; 0 when nothing is kept).
    pub max_over_mean_load: f64,
    /// Mean shared-expert gate value over the call's tokens (`None` without the gate).
    pub shared_gate_mean: Option<f64>,
}

impl MoeStats {
    /// Reads the counts to the host and derives the stats.
    pub fn to_host(&self) -> Result<RoutingStats> {
        let e = self.num_routed_experts;
        // SYNC: stats are read once per call, after the step's compute is queued.
        let picks = self.picks_per_slot.to_host_f32()?;
        let kept: Vec<usize> = self
            .tokens_per_expert
            .to_host_i32()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let real_picks = picks[..e].iter().map(|&c| c as usize).sum::<usize>();
        let null_picks = picks[e..].iter().map(|&c| c as usize).sum::<usize>();
        let kept_total: usize = kept.iter().sum();
        let mean = kept_total as f64 / e as f64;
        let max = kept.iter().copied().max().unwrap_or(0) as f64;
        let slots = (self.tokens * self.slots_per_token).max(1) as f64;
        Ok(RoutingStats {
            dropped: real_picks - kept_total,
            real_picks,
            null_picks,
            null_share: null_picks as f64 / slots,
            mean_real_experts_per_token: real_picks as f64 / self.tokens.max(1) as f64,
            max_over_mean_load: if mean > 0.0 { max / mean } else { 0.0 },
            tokens_per_expert: kept,
            shared_gate_mean: match &self.shared_gate_mean {
                // SYNC: one scalar, read with the counts above.
                Some(g) => Some(g.to_scalar_f32()? as f64),
                None => None,
            },
        })
    }
}
