//! Layers → pipeline stages → ranks, per schedule kind: the one [`StageMap`]
//! type (schedule stage → rank and model stage) that the planner, the
//! schedule generators and the pipeline executor share, and the
//! [`PipelineLayout`] of a plan (layers of each rank's stages).
//!
//! *Schedule stages* are what a pipeline schedule numbers; *model stages* are
//! contiguous layer slices. They coincide except for DualPipe, whose two
//! directions run every model stage twice: schedule stages `0..P` are the
//! forward-direction copies (model stage `s` on rank `s`) and `P..2P` the
//! reverse-direction copies (model stage `s` as schedule stage `P+s`, on rank
//! `P−1−s`). Maps:
//! - gpipe, 1f1b, zb-h1: S = pp, stage s on rank s;
//! - interleaved: S = pp·vpp, loop map (stage s on rank s mod pp);
//! - zbv, dualpipev: S = 2·pp, V map (rank r holds stages r and 2pp−1−r);
//! - dualpipe: V map over 2·pp schedule stages, pp model stages; rank r holds
//!   model stage r *and a mirrored copy* of model stage pp−1−r (parameters 2×,
//!   gradients of the two copies summed before the step).
//!
//! Layers split contiguously: model stage s holds layers [s·L/S, (s+1)·L/S).

use crate::error::{PlanError, Result};
use crate::ScheduleKind;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// Which rank holds each schedule stage, and which model stage (layer slice)
/// each schedule stage computes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMap {
    rank_of: Vec<usize>,
    model_stage_of: Vec<usize>,
    ranks: usize,
}

impl StageMap {
    /// A map from an explicit `rank_of[stage]` list (schedule stage = model
    /// stage); every rank must be `< ranks`.
    pub fn new(rank_of: Vec<usize>, ranks: usize) -> Result<StageMap> {
        if let Some((stage, &rank)) = rank_of.iter().enumerate().find(|(_, &r)| r >= ranks) {
            return Err(PlanError::StageRankOutOfRange { stage, rank, ranks });
        }
        let model_stage_of = (0..rank_of.len()).collect();
        Ok(StageMap {
            rank_of,
            model_stage_of,
            ranks,
        })
    }

    /// Loop map: `stages_per_rank` chunks per rank, stage `c·P + r` on rank `r`
    /// ("0,1,2,3,0,1,2,3" for P = 4, two chunks).
    pub fn looped(ranks: usize, stages_per_rank: usize) -> StageMap {
        let n = ranks * stages_per_rank;
        StageMap {
            rank_of: (0..n).map(|s| s % ranks).collect(),
            model_stage_of: (0..n).collect(),
            ranks,
        }
    }

    /// V map: 2P stages, rank `r` holds stages `r` and `2P−1−r`
    /// ("0,1,2,3,3,2,1,0" for P = 4).
    pub fn v_shape(ranks: usize) -> StageMap {
        let rank_of = (0..2 * ranks)
            .map(|s| if s < ranks { s } else { 2 * ranks - 1 - s })
            .collect();
        StageMap {
            rank_of,
            model_stage_of: (0..2 * ranks).collect(),
            ranks,
        }
    }

    /// DualPipe's map: the V map over 2P schedule stages, schedule stage `s`
    /// computing model stage `s mod P` (module doc).
    pub fn mirrored(ranks: usize) -> StageMap {
        StageMap {
            model_stage_of: (0..2 * ranks).map(|s| s % ranks.max(1)).collect(),
            ..StageMap::v_shape(ranks)
        }
    }

    /// The map of schedule `kind` on `pp` ranks (`vpp` chunks per rank for
    /// interleaved).
    pub fn for_schedule(kind: ScheduleKind, pp: usize, vpp: usize) -> StageMap {
        match kind {
            ScheduleKind::GPipe | ScheduleKind::OneFOneB | ScheduleKind::ZbH1 => {
                StageMap::looped(pp, 1)
            }
            ScheduleKind::Interleaved => StageMap::looped(pp, vpp),
            ScheduleKind::Zbv | ScheduleKind::DualPipeV => StageMap::v_shape(pp),
            ScheduleKind::DualPipe => StageMap::mirrored(pp),
        }
    }

    /// The rank holding schedule stage `stage`, or `None` past the last stage.
    pub fn rank(&self, stage: usize) -> Option<usize> {
        self.rank_of.get(stage).copied()
    }

    /// The model stage (layer slice) schedule stage `stage` computes.
    pub fn model_stage(&self, stage: usize) -> Option<usize> {
        self.model_stage_of.get(stage).copied()
    }

    /// Number of schedule stages.
    pub fn stages(&self) -> usize {
        self.rank_of.len()
    }

    /// Number of distinct model stages (layer slices).
    pub fn model_stages(&self) -> usize {
        self.model_stage_of.iter().max().map_or(0, |&m| m + 1)
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The schedule stages held by `rank`, ascending.
    pub fn stages_of(&self, rank: usize) -> Vec<usize> {
        (0..self.rank_of.len())
            .filter(|&s| self.rank_of[s] == rank)
            .collect()
    }

    /// Schedule stages computing the same model stage as `stage` (DualPipe's
    /// mirrored copies), `stage` included, ascending.
    pub fn copies_of(&self, stage: usize) -> Vec<usize> {
        let Some(m) = self.model_stage(stage) else {
            return Vec::new();
        };
        (0..self.model_stage_of.len())
            .filter(|&s| self.model_stage_of[s] == m)
            .collect()
    }
}

impl fmt::Display for StageMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.rank_of.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

/// Distinct model stages of `kind` with `pp` ranks and `vpp` chunks per rank.
pub fn stage_count(kind: ScheduleKind, pp: usize, vpp: usize) -> usize {
    StageMap::for_schedule(kind, pp, vpp).model_stages()
}

/// Model stages held by pipeline rank `rank`, in the order the rank first runs them.
pub fn rank_stages(kind: ScheduleKind, pp: usize, vpp: usize, rank: usize) -> Vec<usize> {
    let map = StageMap::for_schedule(kind, pp, vpp);
    map.stages_of(rank)
        .into_iter()
        .filter_map(|s| map.model_stage(s))
        .collect()
}

/// One pipeline rank's share of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankStages {
    /// Pipeline rank.
    pub pp_rank: usize,
    /// Model stage indices held (DualPipe: own stage, then the mirrored copy).
    pub stages: Vec<usize>,
    /// Layer ranges of those stages, same order.
    pub layers: Vec<Range<usize>>,
    /// Holds the embedding (stage 0).
    pub has_embedding: bool,
    /// Holds the LM head, final norm and MTP (last stage).
    pub has_head: bool,
}

/// The pipeline layout of a plan: its stage map and each rank's layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineLayout {
    /// Schedule.
    pub schedule: ScheduleKind,
    /// Schedule stage → rank and model stage.
    pub map: StageMap,
    /// Distinct model stages S.
    pub stages: usize,
    /// Layers per model stage L/S.
    pub layers_per_stage: usize,
    /// One entry per pipeline rank.
    pub ranks: Vec<RankStages>,
}

impl PipelineLayout {
    /// Builds the layout; the caller has checked `n_layers % stage_count == 0`.
    pub fn new(kind: ScheduleKind, pp: usize, vpp: usize, n_layers: usize) -> PipelineLayout {
        let map = StageMap::for_schedule(kind, pp, vpp);
        let stages = map.model_stages().max(1);
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
        PipelineLayout {
            schedule: kind,
            map,
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
        let m = PipelineLayout::new(ScheduleKind::DualPipeV, 4, 1, 16);
        assert_eq!(m.stages, 8);
        assert_eq!(m.ranks[0].stages, vec![0, 7]);
        assert_eq!(m.ranks[3].stages, vec![3, 4]);
        assert!(m.ranks[0].has_embedding && m.ranks[0].has_head);
        assert_eq!(m.ranks[0].layers, vec![0..2, 14..16]);
    }

    #[test]
    fn dualpipe_mirrors_stages() {
        let m = PipelineLayout::new(ScheduleKind::DualPipe, 4, 1, 8);
        assert_eq!(m.stages, 4);
        assert_eq!(m.ranks[1].stages, vec![1, 2]);
        assert!(m.ranks[0].has_embedding && m.ranks[0].has_head);
        // Schedule stages 0..4 forward copies, 4..8 reverse copies on the V map.
        assert_eq!(m.map.to_string(), "0,1,2,3,3,2,1,0");
        assert_eq!(m.map.model_stage(5), Some(1));
        assert_eq!(m.map.rank(5), Some(2));
        assert_eq!(m.map.copies_of(1), vec![1, 5]);
    }

    #[test]
    fn interleaved_uses_loop_map() {
        let m = PipelineLayout::new(ScheduleKind::Interleaved, 2, 2, 8);
        assert_eq!(m.ranks[0].stages, vec![0, 2]);
        assert_eq!(m.ranks[1].stages, vec![1, 3]);
        assert!(m.ranks[1].has_head && !m.ranks[0].has_head);
    }

    #[test]
    fn loop_and_v_maps_print_as_in_the_spec() {
        assert_eq!(StageMap::looped(4, 2).to_string(), "0,1,2,3,0,1,2,3");
        assert_eq!(StageMap::v_shape(4).to_string(), "0,1,2,3,3,2,1,0");
        assert_eq!(StageMap::v_shape(4).stages_of(1), vec![1, 6]);
        assert_eq!(StageMap::v_shape(4).copies_of(6), vec![6]);
        assert_eq!(
            StageMap::new(vec![0, 1, 1, 0], 2).unwrap(),
            StageMap::v_shape(2)
        );
    }

    #[test]
    fn map_naming_a_missing_rank_is_rejected() {
        let e = StageMap::new(vec![0, 1, 2], 2).unwrap_err();
        assert_eq!(
            e,
            PlanError::StageRankOutOfRange {
                stage: 2,
                rank: 2,
                ranks: 2
            }
        );
        assert!(e.to_string().contains("stage 2 on rank 2"), "{e}");
    }
}
