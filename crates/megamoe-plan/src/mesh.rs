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
//! dp·cp ranks. Distinct data streams: dp·ep. [`MeshGroup`] names each group kind and
//! [`Mesh::group_members`] lists a rank's group; the trainer builds one communicator per kind
//! from these lists, once.
//!
//! Application order (the seed's `parallelism_3d_sample`), how one rank's shard of the model
//! is cut, [`APPLICATION_ORDER`]:
//! 1. **TP** first: each matrix is split by heads / FFN columns among the tp ranks
//!    (column- and row-parallel layers); every later step sees TP-local shapes.
//! 2. **PP** next: the layers are cut into stages; a rank keeps its pp rank's stages.
//! 3. **FSDP** inside a stage: each TP-local matrix of the stage is sharded on dim 0 over the
//!    parameter's data-parallel group (dense: dp·ep·cp ranks; experts: dp·cp ranks), the
//!    `chunk` rule of [`crate::shard`].
//! 4. **EP** last: the MoE layers' expert banks keep only this ep rank's experts (sharded
//!    over E, never gathered); tokens reach them by all-to-all over the EP group.

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

/// The order in which the parallelisms cut the model into one rank's shard (seed
/// `parallelism_3d_sample`): (name, what it splits).
pub const APPLICATION_ORDER: [(&str, &str); 4] = [
    (
        "tp",
        "heads and FFN columns of every matrix over the tp ranks",
    ),
    (
        "pp",
        "layers into stages; a rank keeps its pp rank's stages",
    ),
    (
        "fsdp",
        "dim-0 rows of each TP-local matrix of a stage over its data-parallel group",
    ),
    ("ep", "routed experts of each MoE layer over the ep ranks"),
];

/// A kind of process group of the mesh: the ranks that differ only in some coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeshGroup {
    /// Tensor-parallel: varies tp (activations all-reduced / gathered per layer).
    Tp,
    /// Context-parallel: varies cp (attention ring).
    Cp,
    /// Expert-parallel: varies ep (token all-to-all per MoE layer).
    Ep,
    /// Pipeline: varies pp (stage-to-stage sends; shared parameters summed).
    Pp,
    /// Data-parallel group of dense parameters: varies dp, ep and cp.
    DenseDp,
    /// Data-parallel group of expert parameters: varies dp and cp.
    ExpertDp,
}

impl MeshGroup {
    /// Every kind, in the order groups are built.
    pub const ALL: [MeshGroup; 6] = [
        MeshGroup::Tp,
        MeshGroup::Cp,
        MeshGroup::Ep,
        MeshGroup::Pp,
        MeshGroup::DenseDp,
        MeshGroup::ExpertDp,
    ];

    /// Short name (`tp`, `dense_dp`, ...).
    pub fn name(self) -> &'static str {
        match self {
            MeshGroup::Tp => "tp",
            MeshGroup::Cp => "cp",
            MeshGroup::Ep => "ep",
            MeshGroup::Pp => "pp",
            MeshGroup::DenseDp => "dense_dp",
            MeshGroup::ExpertDp => "expert_dp",
        }
    }

    /// Which coordinates vary inside one group, as (pp, dp, ep, cp, tp) flags.
    fn varies(self) -> [bool; 5] {
        match self {
            MeshGroup::Tp => [false, false, false, false, true],
            MeshGroup::Cp => [false, false, false, true, false],
            MeshGroup::Ep => [false, false, true, false, false],
            MeshGroup::Pp => [true, false, false, false, false],
            MeshGroup::DenseDp => [false, true, true, true, false],
            MeshGroup::ExpertDp => [false, true, false, true, false],
        }
    }
}

impl RankCoords {
    fn as_array(&self) -> [usize; 5] {
        [self.pp, self.dp, self.ep, self.cp, self.tp]
    }
}

impl Mesh {
    /// World ranks of `rank`'s group of `kind`, ascending (the group's rank order); `None`
    /// when `rank >= world`.
    pub fn group_members(&self, rank: usize, kind: MeshGroup) -> Option<Vec<usize>> {
        let me = self.coords(rank)?.as_array();
        let varies = kind.varies();
        let members = (0..self.world())
            .filter(|&r| {
                self.coords(r).is_some_and(|c| {
                    let c = c.as_array();
                    (0..5).all(|i| varies[i] || c[i] == me[i])
                })
            })
            .collect();
        Some(members)
    }

    /// Every group of `kind` (a partition of the world), ordered by first rank.
    pub fn groups(&self, kind: MeshGroup) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for r in 0..self.world() {
            if out.iter().any(|g| g.contains(&r)) {
                continue;
            }
            if let Some(g) = self.group_members(r, kind) {
                out.push(g);
            }
        }
        out
    }

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
    fn groups_vary_only_their_coordinates() {
        // pp 2 x dp 2 x ep 2 x cp 1 x tp 2 = 16 ranks; rank = ((pp·2 + dp)·2 + ep)·2 + tp.
        let m = Mesh {
            pp: 2,
            dp: 2,
            ep: 2,
            cp: 1,
            tp: 2,
        };
        // Rank 5 = (pp 0, dp 1, ep 0, tp 1), hand-derived from the formula.
        assert_eq!(m.group_members(5, MeshGroup::Tp).unwrap(), vec![4, 5]);
        assert_eq!(m.group_members(5, MeshGroup::Ep).unwrap(), vec![5, 7]);
        assert_eq!(m.group_members(5, MeshGroup::Pp).unwrap(), vec![5, 13]);
        assert_eq!(m.group_members(5, MeshGroup::Cp).unwrap(), vec![5]);
        // Dense DP: same (pp 0, tp 1), any dp and ep: ranks 1, 3, 5, 7.
        assert_eq!(
            m.group_members(5, MeshGroup::DenseDp).unwrap(),
            vec![1, 3, 5, 7]
        );
        // Expert DP: same (pp 0, ep 0, tp 1), any dp: ranks 1, 5.
        assert_eq!(m.group_members(5, MeshGroup::ExpertDp).unwrap(), vec![1, 5]);
        assert!(m.group_members(16, MeshGroup::Tp).is_none());
        for kind in MeshGroup::ALL {
            let groups = m.groups(kind);
            let mut all: Vec<usize> = groups.concat();
            all.sort_unstable();
            assert_eq!(all, (0..16).collect::<Vec<_>>(), "{kind:?} partitions");
            let size = groups[0].len();
            assert!(groups.iter().all(|g| g.len() == size));
        }
        assert_eq!(m.groups(MeshGroup::DenseDp)[0].len(), m.dense_dp_size());
        assert_eq!(m.groups(MeshGroup::ExpertDp)[0].len(), m.expert_dp_size());
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
