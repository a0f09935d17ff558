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
//! optimizer       AdamW on the rank's slices as on one rank; Muon ([`TpGather`]): a
//!                 slice's momentum-updated matrix is all-gathered along its split
//!                 dimension, every TP rank runs Newton-Schulz on the whole matrix and
//!                 keeps its slice (replicated matrices need no gather)
//! checkpoint      each rank's slices written as pieces along their split dimension
//!                 (sharded checkpoints); a resume reads each rank's slice
//! ```
//! With `parallel.fsdp` 1, 2 or 3 (modules `fsdp`, `zero3`) FSDP shards the dim-0 rows of
//! each TP-local tensor over the dense data-parallel group (same tp coordinate), the seed's
//! application order (TP, then FSDP inside a stage): the clip sums the TP slices' row
//! squares over dense_dp and then over tp; distributed Muon gathers a slice's rows over
//! dense_dp, then the slices over tp, runs NS5 on the one-rank matrix and keeps its rows of
//! its slice; checkpoints write the rows of each slice as pieces.
//!
//! With `parallel.sp` (sequence parallelism, `megamoe_model::tp`) the residual stream
//! between the split branches is sharded along the sequence over the TP group: the
//! branches all-gather their input along T and reduce-scatter their output, the norm
//! weights' gradients are summed over the group in the backward (then replicated as
//! above: grad reduce, clip, optimizer and checkpoints are unchanged), MoE layers route
//! the whole gathered micro-batch. Refused by name under sp ([`check_tp_layout`]):
//! GateSkip and FlexiDepth.
//!
//! With pipeline stages see module `pipeline_tp`.

use megamoe_comm::{Communicator, ReduceOp};
use megamoe_model::tp::tp_split_dim;
use megamoe_model::{GradBuffers, Model, ModelParams};
use megamoe_moe::TensorParallel;
use megamoe_optim::{OptimError, Optimizer, RowGather};
use megamoe_plan::{Plan, RowShard};
use megamoe_tensor::Tensor;

use super::Parallel;
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
        for (field, on) in [
            ("gateskip", plan.gate_skip.is_some()),
            ("flexidepth", plan.flexi_depth.is_some()),
        ] {
            if on {
                return refuse(
                    field,
                    "on".to_string(),
                    "is not combined with sequence parallelism (parallel.sp = true): its \
                     gates and routers read whole sequences of the residual stream; set \
                     parallel.sp = false or remove the section",
                );
            }
        }
    }
    Ok(())
}

impl Parallel {
    /// With tp > 1, splits `model` over this rank's TP group.
    pub(crate) fn shard_model_tp(&self, model: &mut Model) -> Result<()> {
        if self.mesh.tp > 1 {
            model.set_tensor_parallel(TensorParallel::new(self.tp.clone()))?;
            if self.sequence_parallel {
                model.set_sequence_parallel()?;
            }
        }
        Ok(())
    }

    /// Whether gradient `name` is this rank's TP slice of a larger parameter.
    pub(crate) fn is_tp_slice(&self, name: &str) -> bool {
        self.mesh.tp > 1 && tp_split_dim(name).is_some()
    }

    /// Σ over the TP group (rank order; the same value on every TP rank).
    pub(crate) fn tp_sum(&self, x: &Tensor) -> Result<Tensor> {
        if self.tp.size() == 1 {
            return Ok(x.clone());
        }
        Ok(self.tp.all_reduce(x, ReduceOp::Sum)?)
    }

    /// The one-rank shape of parameter `name` (or its optimizer state) whose TP-local
    /// shape is `dims` (unchanged for a replicated parameter).
    pub(crate) fn tp_full_dims(&self, name: &str, dims: &mut [usize]) {
        if let Some(d) = tp_split_dim(name).filter(|_| self.mesh.tp > 1) {
            dims[d] *= self.mesh.tp;
        }
    }
}

impl Parallel {
    /// The optimizer step of a tensor-parallel rank: AdamW on its slices as on one rank,
    /// Muon through [`TpGather`]. Collective over the TP group (every TP rank visits the
    /// same parameters in the same order).
    pub(crate) fn tp_optimizer_step(
        &self,
        optimizer: &mut Optimizer,
        params: &mut ModelParams,
        grads: &GradBuffers,
        lr: f64,
    ) -> Result<()> {
        let mut gather = TpGather {
            comm: self.tp.as_ref(),
        };
        optimizer.step_sharded(
            &mut |f| params.visit_mut(f),
            &mut |f| grads.grads().visit(f),
            lr,
            &mut gather,
        )?;
        Ok(())
    }
}

/// Muon on tensor-parallel slices (the Moonlight step over the TP group): the
/// momentum-updated slice `U` is all-gathered along its split dimension in TP rank order
/// (the one-rank matrix), every TP rank runs Newton-Schulz on it (same input, same bits,
/// the Muon scale of the whole matrix) and keeps its own rows or columns of the result.
/// Replicated matrices (router, routed experts, ...) are whole already: no gather.
pub(crate) struct TpGather<'a> {
    pub(crate) comm: &'a dyn Communicator,
}

impl RowGather for TpGather<'_> {
    fn gather_rows(
        &mut self,
        name: &str,
        local: &Tensor,
    ) -> megamoe_optim::Result<Option<(Tensor, RowShard)>> {
        let Some(dim) = tp_split_dim(name) else {
            return Ok(None);
        };
        let n = local.dims().get(dim).copied().unwrap_or(0);
        let full = gather_along(self.comm, local, dim).map_err(|e| OptimError::Gather {
            name: name.to_string(),
            source: Box::new(e),
        })?;
        let start = self.comm.rank() * n;
        Ok(Some((
            full,
            RowShard {
                start,
                len: n,
                padded_len: n,
            },
        )))
    }

    fn keep(&mut self, name: &str, o: &Tensor, rows: RowShard) -> megamoe_optim::Result<Tensor> {
        let dim = tp_split_dim(name).unwrap_or(0);
        Ok(o.narrow(dim, rows.start, rows.len)?)
    }
}

/// Every rank's 2-D `x` concatenated along `dim` (0 or 1) in rank order.
pub(crate) fn gather_along(comm: &dyn Communicator, x: &Tensor, dim: usize) -> Result<Tensor> {
    if dim == 0 {
        return Ok(comm.all_gather(x)?);
    }
    let rows = comm.all_gather(&x.transpose2d()?)?;
    Ok(rows.transpose2d()?)
}
