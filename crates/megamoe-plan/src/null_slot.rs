//! Null-slot routing plan (seed `moe_null_slot_routing_sample.py`, exact).
//!
//! A null slot is a top-k slot a token spends on no expert. With target null
//! share ρ < 1 the router scores E + n_null slots and each token picks k_max.

use crate::error::{PlanError, Result};
use serde::{Deserialize, Serialize};

/// The expanded routing pool.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NullSlotPlan {
    /// Real routed experts E.
    pub n_routed: usize,
    /// Configured top-k.
    pub top_k: usize,
    /// Target null share ρ.
    pub null_rho: f64,
    /// Null copies (indices E..E+n_null−1 of the pool).
    pub n_null_copies: usize,
    /// E + n_null.
    pub expanded_pool_size: usize,
    /// Slots each token picks from the pool.
    pub k_max: usize,
}

/// Seed `null_slot_plan`:
/// n_routed > 0, top_k > 0, ρ ∈ (0, 1] else error; if ρ < 1:
/// n_null = max(1, floor(E·(1−ρ)/ρ)), k_max = ceil(k/ρ); else n_null = 0,
/// k_max = k; then k_max = min(k_max, E + n_null).
pub fn null_slot_plan(n_routed: usize, top_k: usize, null_rho: f64) -> Result<NullSlotPlan> {
    if n_routed == 0 {
        return Err(PlanError::Invalid {
            field: "moe.routed_experts",
            value: n_routed.to_string(),
            rule: "must be positive for null-slot routing",
        });
    }
    if top_k == 0 {
        return Err(PlanError::Invalid {
            field: "moe.top_k",
            value: top_k.to_string(),
            rule: "must be positive",
        });
    }
    // `!(a && b)` also rejects NaN.
    if !(null_rho > 0.0 && null_rho <= 1.0) {
        return Err(PlanError::NullRhoOutOfRange { null_rho });
    }
    let (n_null_copies, k_max) = if null_rho < 1.0 {
        let n = ((n_routed as f64) * (1.0 - null_rho) / null_rho).floor() as usize;
        (n.max(1), (top_k as f64 / null_rho).ceil() as usize)
    } else {
        (0, top_k)
    };
    let expanded_pool_size = n_routed + n_null_copies;
    Ok(NullSlotPlan {
        n_routed,
        top_k,
        null_rho,
        n_null_copies,
        expanded_pool_size,
        k_max: k_max.min(expanded_pool_size),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_slot_plan_half_rho_doubles_pool_and_k() {
        // E=8, k=2, ρ=0.5: n_null = floor(8·0.5/0.5) = 8, k_max = ceil(2/0.5) = 4, pool 16.
        let p = null_slot_plan(8, 2, 0.5).unwrap();
        assert_eq!((p.n_null_copies, p.expanded_pool_size, p.k_max), (8, 16, 4));
    }

    #[test]
    fn null_slot_plan_small_share_keeps_one_copy() {
        // E=8, k=2, ρ=0.95: floor(8·0.05/0.95) = floor(0.421) = 0 → max(1, 0) = 1;
        // k_max = ceil(2/0.95) = ceil(2.105) = 3; pool 9.
        let p = null_slot_plan(8, 2, 0.95).unwrap();
        assert_eq!((p.n_null_copies, p.expanded_pool_size, p.k_max), (1, 9, 3));
    }

    #[test]
    fn null_slot_plan_caps_k_max_at_pool() {
        // E=1, k=1, ρ=0.1: n_null = floor(1·0.9/0.1) = 9 (Python gives 9.0 exactly),
        // k_max = ceil(1/0.1) = 10, pool 10 → k_max 10.
        let p = null_slot_plan(1, 1, 0.1).unwrap();
        assert_eq!(
            (p.n_null_copies, p.expanded_pool_size, p.k_max),
            (9, 10, 10)
        );
        // E=2, k=2, ρ=0.25: n_null = floor(2·0.75/0.25) = 6, k_max = ceil(8) = 8 = pool 8.
        let p = null_slot_plan(2, 2, 0.25).unwrap();
        assert_eq!((p.n_null_copies, p.expanded_pool_size, p.k_max), (6, 8, 8));
    }

    #[test]
    fn null_slot_plan_rho_one_is_off() {
        let p = null_slot_plan(8, 2, 1.0).unwrap();
        assert_eq!((p.n_null_copies, p.expanded_pool_size, p.k_max), (0, 8, 2));
    }

    #[test]
    fn null_slot_plan_rejects_bad_inputs() {
        assert!(matches!(
            null_slot_plan(8, 2, 0.0),
            Err(PlanError::NullRhoOutOfRange { .. })
        ));
        assert!(matches!(
            null_slot_plan(8, 2, 1.5),
            Err(PlanError::NullRhoOutOfRange { .. })
        ));
        assert!(matches!(
            null_slot_plan(8, 2, f64::NAN),
            Err(PlanError::NullRhoOutOfRange { .. })
        ));
        assert!(null_slot_plan(0, 2, 0.5).is_err());
        assert!(null_slot_plan(8, 0, 0.5).is_err());
    }
}
