//! Expert capacity math (seed `expert_parallel_routing_sample.py`, exact).
//!
//! `capacity: usize` always means slots per routed expert per micro-batch, and
//! only [`expert_capacity`] computes it.

use serde::{Deserialize, Serialize};

/// Token-to-expert assignments the router emits: T·k (seed `routed_tokens_per_step`).
pub fn routed_tokens_per_step(tokens: usize, top_k: usize) -> usize {
    tokens * top_k
}

/// Slots per routed expert: C = ceil(T·k / E · capacity_factor) (seed `capacity_per_expert`).
///
/// Computed in f64 exactly as the seed does (`ceil((routed / experts) * factor)`);
/// `experts == 0` gives 0.
pub fn expert_capacity(tokens: usize, top_k: usize, experts: usize, factor: f64) -> usize {
    if experts == 0 {
        return 0;
    }
    let routed = routed_tokens_per_step(tokens, top_k) as f64;
    ((routed / experts as f64) * factor).ceil() as usize
}

/// The seed's `routing_summary`: planning numbers for one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingSummary {
    /// Tokens T.
    pub tokens: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Routed experts E.
    pub routed_experts: usize,
    /// Shared experts.
    pub shared_experts: usize,
    /// Router output width: E + 1 for "token_choice" mode (a reported field, not a behaviour).
    pub router_outputs: usize,
    /// T·k.
    pub routed_tokens: usize,
    /// [`expert_capacity`].
    pub capacity_per_expert: usize,
    /// The routing mode name.
    pub routing_mode: String,
}

/// Seed `routing_summary` (defaults there: shared_experts 1, mode "token_choice", factor 1.0).
pub fn expert_parallel_routing_sample(
    tokens: usize,
    routed_experts: usize,
    top_k: usize,
    shared_experts: usize,
    routing_mode: &str,
    capacity_factor: f64,
) -> RoutingSummary {
    let router_outputs = if routing_mode == "token_choice" {
        routed_experts + 1
    } else {
        routed_experts
    };
    RoutingSummary {
        tokens,
        top_k,
        routed_experts,
        shared_experts,
        router_outputs,
        routed_tokens: routed_tokens_per_step(tokens, top_k),
        capacity_per_expert: expert_capacity(tokens, top_k, routed_experts, capacity_factor),
        routing_mode: routing_mode.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_matches_seed_formula() {
        // 4096 tokens, k=2, 64 experts, cf 1.25: 8192/64 = 128, ×1.25 = 160.
        assert_eq!(expert_capacity(4096, 2, 64, 1.25), 160);
        // 10 tokens, k=2, 8 experts, cf 1.0: 20/8 = 2.5 → 3.
        assert_eq!(expert_capacity(10, 2, 8, 1.0), 3);
        // 128 tokens, k=2, 8 experts, cf 1.0: exactly 32.
        assert_eq!(expert_capacity(128, 2, 8, 1.0), 32);
        assert_eq!(expert_capacity(10, 2, 0, 1.0), 0);
    }

    #[test]
    fn routing_summary_token_choice_reports_e_plus_one_outputs() {
        let s = expert_parallel_routing_sample(1024, 8, 2, 1, "token_choice", 1.0);
        assert_eq!(s.router_outputs, 9);
        assert_eq!(s.routed_tokens, 2048); // 1024·2
        assert_eq!(s.capacity_per_expert, 256); // 2048/8
        let s = expert_parallel_routing_sample(1024, 8, 2, 1, "expert_choice", 1.0);
        assert_eq!(s.router_outputs, 8);
    }
}
