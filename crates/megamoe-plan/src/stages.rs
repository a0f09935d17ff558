//! Layers → pipeline stages → ranks, per schedule kind.
//!
//! Distinct stages S and their owners:
//! - gpipe, 1f1b, zb-h1: S = pp, stage s on rank s;
//! - interleaved: S = pp·vpp, loop map (stage s on rank s mod pp);
//! - zbv, dualpipev: S = 2·pp, V map (rank r holds stages r and 2pp−1−r);
//! - dualpipe: S = pp, and rank r holds stage r *and a mirrored copy* of stage
//!   pp−1−r (parameters 2×, gradients of the two copies summed before the step).
//!
//! Layers split contiguously: stage s holds layers [s·L/S, (s+1)·L/S).

use crate::ScheduleKind;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Distinct pipeline stages of `kind` with `pp` ranks and `vpp` chunks per rank.
pub fn stage_count(kind: ScheduleKind, pp: usize, vpp: usize) -> usize {
    match kind {
        ScheduleKind::GPipe | ScheduleKind::OneFOneB | ScheduleKind::ZbH1 => pp,
        ScheduleKind::Interleaved => pp * vpp,
        ScheduleKind::Zbv | ScheduleKind::DualPipeV => 2 * pp,
        ScheduleKind::DualPipe => pp,
    }
}

/// Stages held by pipeline rank `rank`, in the order the rank first runs them.
pub fn rank_stages(kind: ScheduleKind, pp: usize, vpp: usize, rank: usize) -> Vec<usize> {
    match kind {
        ScheduleKind::GPipe | ScheduleKind::OneFOneB | ScheduleKind::ZbH1 => vec![rank],
        ScheduleKind::Interleaved => (0..vpp).map(|c| c * pp + rank).collect(),
        ScheduleKind::Zbv | ScheduleKind::DualPipeV => vec![rank, 2 * pp - 1 - rank],
        ScheduleKind::DualPipe => vec![rank, pp - 1 - rank],
    }
}

/// One pipeline rank's share of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankStages {
    /// Pipeline rank.
    pub pp_rank: usize,
    /// Stage indices held (DualPipe: own stage, then the mirrored copy).
    pub stages: Vec<usize>,
    /// Layer ranges of those stages, same order.
    pub layers: Vec<Range<usize>>,
    /// Holds the embedding (stage 0).
    pub has_embedding: bool,
    /// Holds the LM head, final norm and MTP (last stage).
    pub has_head: bool,
}

/// The stage map of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMap {
    /// Schedule.
    pub schedule: ScheduleKind,
    /// Distinct stages S.
    pub stages: usize,
    /// Layers per stage L/S.
    pub layers_per_stage: usize,
    /// One entry per pipeline rank.
    pub ranks: Vec<RankStages>,
}

impl StageMap {
    /// Builds the map; the caller has checked `n_layers % stage_count == 0`.
    pub fn new(kind: ScheduleKind, pp: usize, vpp: usize, n_layers: usize) -> StageMap {
        let stages = stage_count(kind, pp, vpp).max(1);
        let per = n_layers / stages;
        let ranks = (0..pp)
            .map(|r| {
                let st = rank_stages(kind, pp, vpp, r);
                RankStages {
                    pp_rank: r,
                    layers: st.iter().map(|&s| s * per..(s + 1) * per).collect(),
                    has_embedding: st.contains(&0),
                    has_head: st.contains(&(stages - 1)),
                    stages: st,
                }
            })
            .collect();
        StageMap {
            schedule: kind,
            stages,
            layers_per_stage: per,
            ranks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v_map_puts_first_and_last_stage_on_rank_zero() {
        let m = StageMap::new(ScheduleKind::DualPipeV, 4, 1, 16);
        assert_eq!(m.stages, 8);
        assert_eq!(m.ranks[0].stages, vec![0, 7]);
        assert_eq!(m.ranks[3].stages, vec![3, 4]);
        assert!(m.ranks[0].has_embedding && m.ranks[0].has_head);
        assert_eq!(m.ranks[0].layers, vec![0..2, 14..16]);
    }

    #[test]
    fn dualpipe_mirrors_stages() {
        let m = StageMap::new(ScheduleKind::DualPipe, 4, 1, 8);
        assert_eq!(m.stages, 4);
        assert_eq!(m.ranks[1].stages, vec![1, 2]);
        assert!(m.ranks[0].has_embedding && m.ranks[0].has_head);
    }

    #[test]
    fn interleaved_uses_loop_map() {
        let m = StageMap::new(ScheduleKind::Interleaved, 2, 2, 8);
        assert_eq!(m.ranks[0].stages, vec![0, 2]);
        assert_eq!(m.ranks[1].stages, vec![1, 3]);
        assert!(m.ranks[1].has_head && !m.ranks[0].has_head);
    }
}
