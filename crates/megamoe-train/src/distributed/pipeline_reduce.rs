//! Data parallelism inside a pipeline stage: the gradients of a pipeline rank's stages
//! summed over the ranks holding the same stage (its data ranks), and which of those
//! copies counts a gradient in the global norm.
//!
//! A stage at pipeline rank p exists on the dp·ep ranks with pp coordinate p. Its dense
//! parameters are replicated on all of them (the dense data-parallel group); its expert
//! banks are cut over E by ep, so each bank shard is replicated on the dp ranks with the
//! same ep coordinate (the expert data-parallel group). After the reduce every copy holds
//! the same sum, as on a data-parallel rank without a pipeline (`reduce.rs`).

use megamoe_comm::{Communicator, Pending, ReduceOp};
use megamoe_optim::ParamRole;
use megamoe_plan::RankCoords;
use megamoe_tensor::Tensor;

use super::pipeline::PipelineGroups;
use crate::error::Result;

/// Sums `grads` over the stage's data ranks in rank order, then scales them by
/// `1 / replicas` (dp·ep): dense gradients over `groups.dense_dp`, expert banks over
/// `groups.expert_dp`, each group's gradients joined into one flat tensor. Every rank of
/// a group passes the same names in the same order (same pipeline rank, same stages).
pub(crate) fn reduce_over_data_ranks(
    groups: PipelineGroups<'_>,
    grads: &mut [(String, Tensor, ParamRole)],
    replicas: usize,
) -> Result<()> {
    let scale = 1.0 / replicas as f32;
    let mut pending: Vec<(Vec<usize>, Pending)> = Vec::new();
    for expert in [false, true] {
        let slots: Vec<usize> = (0..grads.len())
            .filter(|&i| (grads[i].2 == ParamRole::ExpertBank) == expert)
            .collect();
        if slots.is_empty() {
            continue;
        }
        let comm: &dyn Communicator = if expert {
            groups.expert_dp
        } else {
            groups.dense_dp
        };
        let flat = slots
            .iter()
            .map(|&i| grads[i].1.reshape([grads[i].1.numel()]))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let joined = Tensor::cat(&flat.iter().collect::<Vec<_>>(), 0)?;
        pending.push((slots, comm.start_all_reduce(&joined, ReduceOp::Sum)?));
    }
    for (slots, handle) in pending {
        let sum = handle.wait()?.scale(scale)?;
        let mut start = 0;
        for i in slots {
            let g = &mut grads[i].1;
            let n = g.numel();
            *g = sum.narrow(0, start, n)?.reshape(g.dims().to_vec())?;
            start += n;
        }
    }
    Ok(())
}

/// Whether the rank at `coords` counts its copy of a reduced gradient of `role` in the
/// global norm (the pipeline owner is decided separately): a dense gradient on data rank
/// (dp 0, ep 0) only, an expert shard on dp 0 of every ep rank (the shards together are
/// the bank).
pub(crate) fn norm_owner(coords: RankCoords, role: ParamRole) -> bool {
    match role {
        ParamRole::ExpertBank => coords.dp == 0,
        _ => coords.dp == 0 && coords.ep == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(dp: usize, ep: usize) -> RankCoords {
        RankCoords {
            pp: 1,
            dp,
            ep,
            cp: 0,
            tp: 0,
        }
    }

    #[test]
    fn each_gradient_copy_is_counted_once() {
        // dp2 × ep2: the dense copy of (0, 0) and the two expert shards of dp 0.
        let dense: Vec<bool> = [(0, 0), (0, 1), (1, 0), (1, 1)]
            .iter()
            .map(|&(d, e)| norm_owner(at(d, e), ParamRole::Matrix))
            .collect();
        assert_eq!(dense, [true, false, false, false]);
        let expert: Vec<bool> = [(0, 0), (0, 1), (1, 0), (1, 1)]
            .iter()
            .map(|&(d, e)| norm_owner(at(d, e), ParamRole::ExpertBank))
            .collect();
        assert_eq!(expert, [true, true, false, false]);
    }
}
