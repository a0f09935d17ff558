//! Group-limited routing plan (seed `moe_group_routing_sample.py`; DeepSeek-V3).
//!
//! Experts are split into G equal groups; per token the group score is the sum
//! of the top-2 selection scores inside each group (top-1 when a group has one
//! expert); the best M groups are kept and top-k runs over their experts.

use crate::error::{PlanError, Result};
use serde::{Deserialize, Serialize};

/// The static shape of group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRoutingPlan {
    /// Groups G.
    pub n_groups: usize,
    /// Groups kept per token M.
    pub topk_groups: usize,
    /// E / G.
    pub experts_per_group: usize,
    /// Scores summed per group: min(2, E/G) (seed `intra_k`).
    pub intra_group_k: usize,
    /// Experts a token may still choose from: M · E/G.
    pub eligible_experts: usize,
}

/// Checks and describes group routing: G ≥ 1 divides E, 1 ≤ M ≤ G, M·E/G ≥ k.
pub fn group_routing_plan(
    routed_experts: usize,
    n_groups: usize,
    topk_groups: usize,
    top_k: usize,
) -> Result<GroupRoutingPlan> {
    if n_groups == 0 {
        return Err(PlanError::Invalid {
            field: "moe.n_groups",
            value: "0".into(),
            rule: "must be positive (1 = group routing off)",
        });
    }
    if !routed_experts.is_multiple_of(n_groups) {
        return Err(PlanError::GroupsNotDividingExperts {
            n_groups,
            routed_experts,
        });
    }
    if topk_groups == 0 || topk_groups > n_groups {
        return Err(PlanError::TopkGroupsExceedsGroups {
            topk_groups,
            n_groups,
        });
    }
    let experts_per_group = routed_experts / n_groups;
    if topk_groups * experts_per_group < top_k {
        return Err(PlanError::GroupsTooFewExperts {
            topk_groups,
            experts_per_group,
            top_k,
        });
    }
    Ok(GroupRoutingPlan {
        n_groups,
        topk_groups,
        experts_per_group,
        intra_group_k: experts_per_group.min(2),
        eligible_experts: topk_groups * experts_per_group,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseek_v3_groups_keep_four_of_eight() {
        // DeepSeek-V3: 256 experts, 8 groups, top-4 groups, k=8 → 32 per group, 128 eligible.
        let g = group_routing_plan(256, 8, 4, 8).unwrap();
        assert_eq!(g.experts_per_group, 32);
        assert_eq!(g.intra_group_k, 2);
        assert_eq!(g.eligible_experts, 128);
    }

    #[test]
    fn single_expert_groups_score_top1() {
        let g = group_routing_plan(4, 4, 2, 2).unwrap();
        assert_eq!(g.intra_group_k, 1);
    }

    #[test]
    fn group_routing_rejects_bad_shapes() {
        assert!(matches!(
            group_routing_plan(8, 3, 1, 2),
            Err(PlanError::GroupsNotDividingExperts { .. })
        ));
        assert!(matches!(
            group_routing_plan(8, 4, 5, 2),
            Err(PlanError::TopkGroupsExceedsGroups { .. })
        ));
        assert!(matches!(
            group_routing_plan(8, 4, 0, 2),
            Err(PlanError::TopkGroupsExceedsGroups { .. })
        ));
        // 1 group of 2 experts cannot serve k=4.
        assert!(matches!(
            group_routing_plan(8, 4, 1, 4),
            Err(PlanError::GroupsTooFewExperts { .. })
        ));
    }
}
