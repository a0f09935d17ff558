//! Stage → rank maps (loop and V) and pipeline chains.
//!
//! A *stage* is a contiguous slice of layers; the schedule IR numbers stages
//! globally. A [`StageMap`] (the planner's type, re-exported: one map for
//! the plan, the schedules and the executor) says which rank holds each
//! stage (each stage on exactly one rank) and which model stage it computes. A [`Chain`] is one forward path through stages that a
//! set of microbatches takes: one chain `0..S` for every kind except DualPipe,
//! whose two directions are two chains (see [`crate::generators::dualpipe`]).

use crate::error::{Error, Result};
pub use megamoe_plan::StageMap;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Parses "0,1,2,3,3,2,1,0" (rank of each stage, in stage order).
pub fn parse_stage_map(text: &str, ranks: usize) -> Result<StageMap> {
    let rank_of = text
        .split(',')
        .map(|f| {
            f.trim().parse::<usize>().map_err(|_| Error::ParseAction {
                text: f.to_string(),
                reason: "stage map entries must be rank numbers",
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StageMap::new(rank_of, ranks)?)
}

/// One forward path: `stages` in forward order, taken by `microbatches`.
/// The loss is computed after the last stage; gradients flow back along it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// Stages in forward order.
    pub stages: Vec<usize>,
    /// Microbatch ids that enter this chain.
    pub microbatches: Range<usize>,
}

impl Chain {
    /// The usual single chain `0..stages` for microbatches `0..m`.
    pub fn linear(stages: usize, microbatches: usize) -> Chain {
        Chain {
            stages: (0..stages).collect(),
            microbatches: 0..microbatches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use megamoe_plan::PlanError;

    #[test]
    fn stage_map_text_parses() {
        assert_eq!(parse_stage_map("0,1,1,0", 2).unwrap(), StageMap::v_shape(2));
        assert!(matches!(
            parse_stage_map("0,x", 2),
            Err(Error::ParseAction { .. })
        ));
    }

    #[test]
    fn map_naming_a_missing_rank_is_rejected() {
        let e = parse_stage_map("0,1,2", 2).unwrap_err();
        assert_eq!(
            e,
            Error::Plan(PlanError::StageRankOutOfRange {
                stage: 2,
                rank: 2,
                ranks: 2
            })
        );
    }
}
