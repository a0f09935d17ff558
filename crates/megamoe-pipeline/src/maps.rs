//! Stage → rank maps (loop and V) and pipeline chains.
//!
//! A *stage* is a contiguous slice of layers; the schedule IR numbers stages
//! globally. A [`StageMap`] says which rank holds each stage (each stage on
//! exactly one rank). A [`Chain`] is one forward path through stages that a
//! set of microbatches takes: one chain `0..S` for every kind except DualPipe,
//! whose two directions are two chains (see [`crate::generators::dualpipe`]).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// Which rank holds each stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMap {
    rank_of: Vec<usize>,
    ranks: usize,
}

impl StageMap {
    /// A map from an explicit `rank_of[stage]` list; every rank must be `< ranks`.
    pub fn new(rank_of: Vec<usize>, ranks: usize) -> Result<StageMap> {
        if let Some((stage, &rank)) = rank_of.iter().enumerate().find(|(_, &r)| r >= ranks) {
            return Err(Error::RankOutOfRange { stage, rank, ranks });
        }
        Ok(StageMap { rank_of, ranks })
    }

    /// Loop map: `stages_per_rank` chunks per rank, stage `c·P + r` on rank `r`
    /// ("0,1,2,3,0,1,2,3" for P = 4, two chunks).
    pub fn looped(ranks: usize, stages_per_rank: usize) -> StageMap {
        StageMap {
            rank_of: (0..ranks * stages_per_rank).map(|s| s % ranks).collect(),
            ranks,
        }
    }

    /// V map: 2P stages, rank `r` holds stages `r` and `2P−1−r`
    /// ("0,1,2,3,3,2,1,0" for P = 4).
    pub fn v_shape(ranks: usize) -> StageMap {
        let rank_of = (0..2 * ranks)
            .map(|s| if s < ranks { s } else { 2 * ranks - 1 - s })
            .collect();
        StageMap { rank_of, ranks }
    }

    /// Parses "0,1,2,3,3,2,1,0" (rank of each stage, in stage order).
    pub fn parse(text: &str, ranks: usize) -> Result<StageMap> {
        let rank_of = text
            .split(',')
            .map(|f| {
                f.trim().parse::<usize>().map_err(|_| Error::ParseAction {
                    text: f.to_string(),
                    reason: "stage map entries must be rank numbers",
                })
            })
            .collect::<Result<Vec<_>>>()?;
        StageMap::new(rank_of, ranks)
    }

    /// The rank holding `stage`, or `None` past the last stage.
    pub fn rank(&self, stage: usize) -> Option<usize> {
        self.rank_of.get(stage).copied()
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.rank_of.len()
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The stages held by `rank`, ascending.
    pub fn stages_of(&self, rank: usize) -> Vec<usize> {
        (0..self.rank_of.len())
            .filter(|&s| self.rank_of[s] == rank)
            .collect()
    }
}

impl fmt::Display for StageMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.rank_of.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
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

    #[test]
    fn loop_and_v_maps_print_as_in_the_spec() {
        assert_eq!(StageMap::looped(4, 2).to_string(), "0,1,2,3,0,1,2,3");
        assert_eq!(StageMap::v_shape(4).to_string(), "0,1,2,3,3,2,1,0");
        assert_eq!(StageMap::v_shape(4).stages_of(1), vec![1, 6]);
        assert_eq!(StageMap::parse("0,1,1,0", 2).unwrap(), StageMap::v_shape(2));
    }

    #[test]
    fn map_naming_a_missing_rank_is_rejected() {
        let e = StageMap::parse("0,1,2", 2).unwrap_err();
        assert_eq!(
            e,
            Error::RankOutOfRange {
                stage: 2,
                rank: 2,
                ranks: 2
            }
        );
    }
}
