//! Routing statistics of one call: tokens per expert, dropped assignments, null share,
//! mean real experts per token, max/mean load.
//!
//! The layer returns [`MoeStats`] as device tensors (no sync in forward beyond the one
//! dispatch already makes); [`MoeStats::to_host`] reads them once into [`RoutingStats`].

use megamoe_tensor::Tensor;

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
        })
    }
}
