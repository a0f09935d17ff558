//! The device mesh: how world = pp·dp·ep·cp·tp ranks are laid out.
//!
//! Rank order is (pp, dp, ep, cp, tp) with **tp fastest**:
//!
//! ```text
//! rank = (((pp_rank·dp + dp_rank)·ep + ep_rank)·cp + cp_rank)·tp + tp_rank
//! ```
//!
//! Why this order: TP exchanges the most data per layer, so its ranks are
//! adjacent (same host, NVLink); CP next (attention ring), then EP
//! (all-to-all per MoE layer), then DP (one reduce per step) and PP outermost
//! (point-to-point between stages, tolerant of slow links).
//!
//! Groups: a TP group varies tp only; an EP group varies ep; a PP group varies
//! pp. The data-parallel group of a *dense* parameter is every rank with the
//! same (pp, tp): dp·ep·cp ranks (EP ranks see different data, as in Megatron;
//! CP ranks see different slices of the same sequences). The data-parallel
//! group of an *expert* parameter is every rank with the same (pp, ep, tp):
//! dp·cp ranks. Distinct data streams: dp·ep.

use serde::{Deserialize, Serialize};

/// Sizes of the five mesh dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    /// Pipeline ranks (outermost).
    pub pp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Expert-parallel ranks.
    pub ep: usize,
    /// Context-parallel ranks.
    pub cp: usize,
    /// Tensor-parallel ranks (fastest).
    pub tp: usize,
}

/// A rank's coordinates in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RankCoords {
    /// Pipeline rank.
    pub pp: usize,
    /// Data-parallel rank.
    pub dp: usize,
    /// Expert-parallel rank.
    pub ep: usize,
    /// Context-parallel rank.
    pub cp: usize,
    /// Tensor-parallel rank.
    pub tp: usize,
}

impl Mesh {
    /// pp·dp·ep·cp·tp.
    pub fn world(&self) -> usize {
        self.pp * self.dp * self.ep * self.cp * self.tp
    }

    /// Coordinates of `rank`, `None` when `rank >= world`.
    pub fn coords(&self, rank: usize) -> Option<RankCoords> {
        if rank >= self.world() {
            return None;
        }
        let tp = rank % self.tp;
        let r = rank / self.tp;
        let cp = r % self.cp;
        let r = r / self.cp;
        let ep = r % self.ep;
        let r = r / self.ep;
        let dp = r % self.dp;
        let pp = r / self.dp;
        Some(RankCoords { pp, dp, ep, cp, tp })
    }

    /// The rank at `c`, `None` when a coordinate is out of range.
    pub fn rank(&self, c: RankCoords) -> Option<usize> {
        if c.pp >= self.pp
            || c.dp >= self.dp
            || c.ep >= self.ep
            || c.cp >= self.cp
            || c.tp >= self.tp
        {
            return None;
        }
        Some((((c.pp * self.dp + c.dp) * self.ep + c.ep) * self.cp + c.cp) * self.tp + c.tp)
    }

    /// Ranks that hold the same dense-parameter shard (reduce gradients over them): dp·ep·cp.
    pub fn dense_dp_size(&self) -> usize {
        self.dp * self.ep * self.cp
    }

    /// Ranks that hold the same experts (reduce expert gradients over them): dp·cp.
    pub fn expert_dp_size(&self) -> usize {
        self.dp * self.cp
    }

    /// Distinct data streams (sequence sets) per step: dp·ep.
    pub fn data_replicas(&self) -> usize {
        self.dp * self.ep
    }

    /// One line describing the product, e.g. `8 = pp 2 × dp 1 × ep 2 × cp 1 × tp 2`.
    pub fn describe(&self) -> String {
        format!(
            "{} = pp {} x dp {} x ep {} x cp {} x tp {} (rank order pp, dp, ep, cp, tp; tp fastest)",
            self.world(),
            self.pp,
            self.dp,
            self.ep,
            self.cp,
            self.tp
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tp_is_the_fastest_coordinate() {
        let m = Mesh {
            pp: 2,
            dp: 1,
            ep: 2,
            cp: 1,
            tp: 2,
        };
        assert_eq!(m.world(), 8);
        // rank 1 = tp 1; rank 2 = ep 1; rank 4 = pp 1 (hand-computed from the formula).
        assert_eq!(
            m.coords(1).unwrap(),
            RankCoords {
                pp: 0,
                dp: 0,
                ep: 0,
                cp: 0,
                tp: 1
            }
        );
        assert_eq!(
            m.coords(2).unwrap(),
            RankCoords {
                pp: 0,
                dp: 0,
                ep: 1,
                cp: 0,
                tp: 0
            }
        );
        assert_eq!(
            m.coords(7).unwrap(),
            RankCoords {
                pp: 1,
                dp: 0,
                ep: 1,
                cp: 0,
                tp: 1
            }
        );
        assert!(m.coords(8).is_none());
    }

    #[test]
    fn coords_and_rank_are_inverse() {
        let m = Mesh {
            pp: 2,
            dp: 3,
            ep: 2,
            cp: 2,
            tp: 2,
        };
        for r in 0..m.world() {
            assert_eq!(m.rank(m.coords(r).unwrap()), Some(r));
        }
        assert_eq!(m.dense_dp_size(), 12);
        assert_eq!(m.expert_dp_size(), 6);
        assert_eq!(m.data_replicas(), 6);
    }
}
