//! Tensor parallelism inside pipeline stages (`parallel.pp` × `parallel.tp`): the tp
//! ranks of a stage (same pp, dp, ep) each hold their slice of the stage's attention and
//! dense / shared-expert FFN matrices (the model's blocks are split as without a
//! pipeline, module `tp`), run the same schedule on the same micro-batches and exchange
//! activations with the same tp coordinate of the neighbouring stage.
//!
//! ```text
//! statistics   every tp rank of a pipeline computes the same losses, routing counts,
//!              layer values and expert picks: only tp rank 0 adds them to the world sums
//! clip         a TP slice's Σ g² is added by every tp rank (different slices), a
//!              replicated tensor's by tp rank 0 only
//! optimizer    AdamW on the slices; Muon gathers a slice's matrix over the TP group,
//!              runs NS5 on the whole matrix and keeps its slice (`tp::TpGather`)
//! checkpoints  each rank's slices written as pieces along their split dimension
//!              (sharded checkpoints); a load reads the slice
//! ```
//! With `parallel.fsdp` 1/2 too (module `pipeline_fsdp`) the rows of each slice are
//! sharded over the stage's data ranks: Muon gathers rows, then slices.

use megamoe_comm::Communicator;
use megamoe_model::tp::tp_split_dim;
use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use super::pipeline::PipelineRank;
use super::pipeline_tensors::param_of;
use crate::checkpoint::TensorSpec;
use crate::error::Result;

impl PipelineRank {
    /// tp size of the run.
    fn tp_size(&self) -> usize {
        self.plan.parallel.tp.max(1)
    }

    /// Whether this rank's copies of the step's statistics are another tp rank's too
    /// (tp rank > 0): it adds zeros to the world sums.
    pub(super) fn repeats_statistics(&self) -> bool {
        self.coords.tp != 0
    }

    /// Whether this rank adds the Σ g² of tensor `name` to the norm on the tp axis: a TP
    /// slice on every tp rank, a replicated tensor on tp rank 0.
    pub(super) fn counts_on_tp_axis(&self, name: &str) -> bool {
        self.coords.tp == 0 || tp_split_dim(name).is_some()
    }

    /// The checkpoint specs of [`super::pipeline_tensors::PipelineTensors::checkpoint_specs`]
    /// in one-rank shapes: TP slices' split dimension × tp.
    pub(super) fn one_rank_specs(&self, ep: usize) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let (mut model, mut optimizer) = self.tensors.checkpoint_specs(ep);
        let tp = self.tp_size();
        if tp > 1 {
            for s in model.iter_mut().chain(optimizer.iter_mut()) {
                if let Some(d) = tp_split_dim(param_of(&s.name)) {
                    s.shape[d] *= tp;
                }
            }
        }
        (model, optimizer)
    }

    /// The optimizer step of a pipeline rank under tp > 1: AdamW on the slices, Muon
    /// gathering each slice's matrix over `tp`. Collective over the TP group.
    pub(super) fn tp_optimizer_step(
        &mut self,
        tp: &dyn Communicator,
        grads: &[(String, Tensor, ParamRole)],
        lr: f64,
    ) -> Result<()> {
        let mut gather = super::tp::TpGather { comm: tp };
        let params = &mut self.params;
        self.optimizer.step_sharded(
            &mut |f| super::pipeline::visit_distinct_mut(params, f),
            &mut |f| grads.iter().for_each(|(n, g, r)| f(n, g, *r)),
            lr,
            &mut gather,
        )?;
        Ok(())
    }
}
