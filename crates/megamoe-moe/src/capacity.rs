//! Capacity and dropping (seed `expert_parallel_routing_sample.py`; MOE_DECISIONS §8).
//!
//! Routed assignments are T·k; each routed expert takes at most C = ceil(T·k / E · cf)
//! (k = top_k, also with null slots; only [`expert_capacity`] computes it). Over capacity,
//! [`DropPolicy::Probs`] keeps the highest gates (ties → lower token, then lower slot) and
//! [`DropPolicy::Position`] keeps the earliest assignments in (token, slot) order. Dropped
//! assignments contribute zero output and receive zero gradient; the other gates of their
//! token are NOT renormalised. `pad_to_capacity` changes only buffer shapes
//! (see `dispatch.rs`), never which assignments are kept.

pub use megamoe_plan::expert_capacity;
use megamoe_plan::DropPolicy;
use megamoe_tensor::ops::routing::KeepOrder;
use megamoe_tensor::Tensor;

use crate::error::Result;
use crate::router::Routing;

/// The kernel order that implements `policy`.
pub fn keep_order(policy: DropPolicy) -> KeepOrder {
    match policy {
        DropPolicy::Probs => KeepOrder::HighestGate,
        DropPolicy::Position => KeepOrder::Earliest,
    }
}

/// Which assignments survive: `keep [N, K]` f32, 1 for a kept real-expert assignment, 0 for
/// a dropped one or a null slot. `capacity = None` is dropless (every real pick kept).
pub fn apply_capacity(
    routing: &Routing,
    num_routed_experts: usize,
    capacity: Option<usize>,
    policy: DropPolicy,
) -> Result<Tensor> {
    Ok(routing.slots.capacity_keep(
        &routing.gates,
        num_routed_experts,
        capacity,
        keep_order(policy),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use megamoe_tensor::{DType, Device};

    fn routing(slots: Vec<i32>, gates: Vec<f32>, n: usize, k: usize) -> Routing {
        Routing {
            slots: Tensor::from_vec_i32(slots, [n, k], Device::Cpu).unwrap(),
            gates: Tensor::from_vec_f32(gates, [n, k], Device::Cpu).unwrap(),
            logits: Tensor::zeros([n, 2], DType::F32, Device::Cpu).unwrap(),
        }
    }

    #[test]
    fn capacity_probs_keeps_highest_gates_position_keeps_earliest() {
        // 4 tokens, k=1, all to expert 0, C = 2. Gates 0.1, 0.9, 0.5, 0.9.
        let r = routing(vec![0, 0, 0, 0], vec![0.1, 0.9, 0.5, 0.9], 4, 1);
        let probs = apply_capacity(&r, 2, Some(2), DropPolicy::Probs).unwrap();
        // highest two: tokens 1 and 3 (0.9 tie → lower token first, both kept)
        assert_eq!(probs.to_host_f32().unwrap(), vec![0., 1., 0., 1.]);
        let pos = apply_capacity(&r, 2, Some(2), DropPolicy::Position).unwrap();
        assert_eq!(pos.to_host_f32().unwrap(), vec![1., 1., 0., 0.]);
    }

    #[test]
    fn capacity_probs_ties_go_to_lower_token_then_slot() {
        // token 0 slots (e0, e0)? not possible in top-k; use 3 tokens k=1 equal gates, C=1.
        let r = routing(vec![1, 1, 1], vec![0.5, 0.5, 0.5], 3, 1);
        let keep = apply_capacity(&r, 2, Some(1), DropPolicy::Probs).unwrap();
        assert_eq!(keep.to_host_f32().unwrap(), vec![1., 0., 0.]);
    }

    #[test]
    fn capacity_probs_many_tied_gates_keep_the_lowest_tokens() {
        // Rust's unstable sort is an insertion sort (hence stable) up to 20 elements, so only
        // more than 20 tied gates on one expert tell a stable sort from an unstable one.
        // 64 tokens, k = 2, every token picks experts 0 and 1 (slot order alternating);
        // gates are 0.5 except every 9th token at 0.9. C = 24: expert 0 keeps the seven 0.9
        // picks, then the 17 lowest tokens among the 57 tied at 0.5.
        let n = 64;
        let mut slots = Vec::new();
        let mut gates = Vec::new();
        for t in 0..n {
            let first = (t % 2) as i32;
            slots.extend([first, 1 - first]);
            let g = if t % 9 == 4 { 0.9 } else { 0.5 };
            gates.extend([g, g]);
        }
        let r = routing(slots.clone(), gates, n, 2);
        let keep = apply_capacity(&r, 2, Some(24), DropPolicy::Probs).unwrap();
        let keep = keep.to_host_f32().unwrap();
        for expert in 0..2 {
            let mut tied_kept = 0;
            for t in 0..n {
                let a = 2 * t
                    + slots[2 * t..2 * t + 2]
                        .iter()
                        .position(|&s| s == expert)
                        .unwrap();
                let want = if t % 9 == 4 {
                    true
                } else {
                    tied_kept += 1;
                    tied_kept <= 17
                };
                assert_eq!(keep[a] == 1.0, want, "expert {expert}, token {t}");
            }
        }
    }

    #[test]
    fn capacity_null_slots_are_never_kept_and_do_not_count() {
        // E=2, slot 2 is a null copy; C=1.
        let r = routing(vec![2, 0, 0, 2], vec![0.0, 0.7, 0.8, 0.0], 2, 2);
        let keep = apply_capacity(&r, 2, Some(1), DropPolicy::Probs).unwrap();
        assert_eq!(keep.to_host_f32().unwrap(), vec![0., 0., 1., 0.]);
        let dropless = apply_capacity(&r, 2, None, DropPolicy::Probs).unwrap();
        assert_eq!(dropless.to_host_f32().unwrap(), vec![0., 1., 1., 0.]);
    }

    #[test]
    fn expert_capacity_seed_numbers() {
        // seed: ceil(T·k/E·cf): 32·2/8·1.0 = 8; 32·2/8·0.75 = 6; 32·2/8·1.25 = 10.
        assert_eq!(expert_capacity(32, 2, 8, 1.0), 8);
        assert_eq!(expert_capacity(32, 2, 8, 0.75), 6);
        assert_eq!(expert_capacity(32, 2, 8, 1.25), 10);
    }
}
