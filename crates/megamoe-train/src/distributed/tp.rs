//! Tensor parallelism in the distributed trainer (Megatron-LM): the ranks of a TP group
//! (same pp, dp, ep; tp fastest in the rank order) read the same micro-batches and each
//! holds a slice of every attention and dense-FFN matrix (model crate, `megamoe_model::tp`).
//!
//! ```text
//! shard_model     Model::set_tensor_parallel: heads / hidden units of this TP rank,
//!                 weights drawn as the one-rank tensors' rows / columns
//! forward         one all-reduce per attention branch and per dense / shared-expert FFN
//! backward        the conjugate all-reduce of each branch's input gradient
//! grad reduce     unchanged: a TP slice is reduced with the same slice of the other data
//!                 ranks (the dense data-parallel group has the same tp coordinate)
//! clip            Σ g² of the TP slices summed over the TP group; the replicated
//!                 parameters (norms, router, routed experts, embedding, head) are
//!                 identical on every TP rank and counted once
//! checkpoint      TP slices all-gathered along their split dimension: the one-rank layout
//! ```
//! Refused by name ([`check_tp_layout`]): tp with pipeline stages, with sharded optimizer
//! state (`parallel.fsdp` > 0), with sequence parallelism, and with Muon (its
//! Newton-Schulz step needs the whole matrix).

use megamoe_comm::{Communicator, ReduceOp};
use megamoe_model::Model;
use megamoe_moe::TensorParallel;
use megamoe_plan::{OptimizerKind, Plan, ZeroLevel};
use megamoe_tensor::{Device, Tensor};

use super::Parallel;
use crate::checkpoint::NamedTensor;
use crate::error::{Error, Result};

/// Refuses tensor-parallel layouts the trainer cannot run, naming the key.
pub(crate) fn check_tp_layout(plan: &Plan) -> Result<()> {
    let p = &plan.parallel;
    if p.tp <= 1 {
        return Ok(());
    }
    let refuse = |field: &'static str, value: String, rule: &str| {
        Err(Error::TrainConfig {
            field,
            value,
            rule: rule.to_string(),
        })
    };
    if p.sp {
        return refuse(
            "parallel.sp",
            "true".to_string(),
            "sequence parallelism is not implemented; tensor parallelism runs with the \
             activations replicated over the TP group (set parallel.sp = false)",
        );
    }
    if p.zero != ZeroLevel::Replicated {
        return refuse(
            "parallel.fsdp",
            p.zero.level().to_string(),
            "sharded optimizer state is not combined with tensor parallelism yet (set \
             parallel.fsdp = 0 with parallel.tp > 1)",
        );
    }
    if plan.optim.kind == OptimizerKind::Muon {
        return refuse(
            "parallel.tp",
            p.tp.to_string(),
            "Muon on tensor-parallel slices (gather the whole matrix, Newton-Schulz, keep \
             the slice) is not implemented; use optim.name = \"adamw\" with parallel.tp > 1",
        );
    }
    Ok(())
}

impl Parallel {
    /// With tp > 1, splits `model` over this rank's TP group.
    pub(crate) fn shard_model_tp(&self, model: &mut Model) -> Result<()> {
        if self.mesh.tp > 1 {
            model.set_tensor_parallel(TensorParallel::new(self.tp.clone()))?;
        }
        Ok(())
    }

    /// Whether gradient `name` is this rank's TP slice of a larger parameter.
    pub(crate) fn is_tp_slice(&self, name: &str) -> bool {
        self.mesh.tp > 1 && megamoe_model::tp::tp_split_dim(name).is_some()
    }

    /// Σ over the TP group (rank order; the same value on every TP rank).
    pub(crate) fn tp_sum(&self, x: &Tensor) -> Result<Tensor> {
        if self.tp.size() == 1 {
            return Ok(x.clone());
        }
        Ok(self.tp.all_reduce(x, ReduceOp::Sum)?)
    }

    /// Checkpoint tensors (parameters and their optimizer state, `param_of` maps a name to
    /// its parameter) in the one-rank layout: every TP slice all-gathered along its split
    /// dimension, in TP rank order. Collective over the TP group.
    pub(crate) fn gather_tp_slices(
        &self,
        tensors: &mut [NamedTensor],
        param_of: fn(&str) -> &str,
    ) -> Result<()> {
        if self.mesh.tp == 1 {
            return Ok(());
        }
        for t in tensors.iter_mut() {
            let Some(dim) = megamoe_model::tp::tp_split_dim(param_of(&t.name)) else {
                continue;
            };
            let local = t.to_tensor(Device::Cpu)?;
            let full = gather_along(self.tp.as_ref(), &local, dim)?;
            *t = NamedTensor::from_tensor(t.name.clone(), &full)?;
        }
        Ok(())
    }
}

/// Every rank's 2-D `x` concatenated along `dim` (0 or 1) in rank order.
fn gather_along(comm: &dyn Communicator, x: &Tensor, dim: usize) -> Result<Tensor> {
    if dim == 0 {
        return Ok(comm.all_gather(x)?);
    }
    let rows = comm.all_gather(&x.transpose2d()?)?;
    Ok(rows.transpose2d()?)
}
