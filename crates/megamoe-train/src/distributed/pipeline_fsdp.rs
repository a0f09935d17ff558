//! FSDP inside a pipeline stage (`parallel.fsdp` 1, 2 or 3 with `parallel.pp`, ZeRO-1/2/3
//! over each stage's data-parallel group): a pipeline rank's optimizer holds the state of
//! its dim-0 rows only (the FSDP2 `chunk` rule; dense parameters over the stage's dense
//! data-parallel group of dp·ep ranks, expert banks over its expert one of dp ranks), as
//! module `fsdp` does without a pipeline; with `fsdp = 3` the stage's parameters are rows
//! between steps too (module `zero3` without a pipeline).
//!
//! ```text
//! step start (3)       the stage's tensors outside the blocks (embedding, final norm,
//!                      LM head, MTP) all-gathered for the step
//! each block (3)       F: its rows all-gathered just before its forward by the model's
//!                      BlockGather hook (the next block of the chunk prefetched), the
//!                      full tensors dropped after it; I (backward for the input, and B's
//!                      first half): gathered again the same way (recompute and input
//!                      gradients need the weights); W (the weight-gradient pass of
//!                      ZB-H1 / ZBV / DualPipe / DualPipeV, and B's second half): nothing
//!                      gathered — dW = dYᵀX reads the activations and output gradients
//!                      the I pass deferred, never the weights
//! after the schedule   each distinct gradient (full shape, accumulated over the
//!                      micro-batches) reduce-scattered into the rank's rows (sum in rank
//!                      order, × 1/(dp·ep)) instead of all-reduced
//! clip                 every data rank counts its rows (the lowest pp rank holding a
//!                      tensor still owns it), all-reduced over the world
//! optimizer            AdamW on the rows; Muon gathers each matrix's rows over its group,
//!                      runs NS5 on the whole matrix and keeps its rows (`fsdp::GroupGather`)
//! after the optimizer  1/2: the updated rows all-gathered into the stage parameters the
//!                      next schedule run, evaluation and sampling read; 3: the stage
//!                      parameters are the updated rows themselves (shared handles)
//! eval / sampling (3)  the forward-only pass gathers like a forward
//! checkpoints          the rows of every state tensor (and with 3 of every parameter)
//!                      gathered over the group before the stage's tensors are written; a
//!                      load cuts the rows again
//! ```
//! Every gather is collective over the stage's data groups: their ranks share the pipeline
//! coordinate, so they run the same schedule program over the same blocks in the same
//! order, as the expert all-to-all inside a stage already relies on.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use megamoe_comm::{Communicator, Pending, ReduceOp};
use megamoe_model::ChunkParams;
use megamoe_optim::{Optimizer, ParamRole};
use megamoe_plan::{chunk, OptimPlan, RankCoords, RowShard};
use megamoe_tensor::Tensor;

use super::fsdp::{pad_rows, GroupGather};
use super::pipeline::{share_embedding, visit_distinct, visit_distinct_mut, PipelineGroups};
use super::pipeline_tensors::param_of;
use super::zero3::{outside_blocks, RowGatherer};
use crate::error::{Error, Result};

/// This pipeline rank's rows of its stages' distinct parameters.
#[derive(Debug)]
pub(crate) struct StageShards {
    /// Per parameter (visit order): its row shard and whether it is an expert bank.
    rows: Vec<(RowShard, bool)>,
    /// Per parameter (visit order): its full dim-0 rows.
    full_rows: Vec<usize>,
    /// Visit index of each parameter name.
    index: HashMap<String, usize>,
    /// The rows the optimizer updates: (name, rows, role), visit order.
    params: Vec<(String, Tensor, ParamRole)>,
    /// (size, rank) of the dense and of the expert data-parallel group.
    dense: (usize, usize),
    expert: (usize, usize),
    /// `parallel.fsdp = 3`: the stage parameters are these rows between steps.
    rows_only: bool,
    /// `parallel.fsdp = 3`: the all-gather of rows into full tensors (also the model's
    /// per-block hook), set by [`super::pipeline::PipelineRank::attach_row_gather`].
    gatherer: Option<RowGatherer>,
}

impl StageShards {
    /// Cuts `params` (every rank of a stage's data groups holds the same initial values)
    /// into the rows of the rank at `coords` in a mesh of `dp` × `ep` data ranks;
    /// `rows_only` (`parallel.fsdp = 3`) keeps the parameters as rows between steps.
    pub(crate) fn new(
        params: &BTreeMap<usize, ChunkParams>,
        coords: RankCoords,
        dp: usize,
        ep: usize,
        rows_only: bool,
    ) -> Result<StageShards> {
        // Group ranks in world-rank order: (dp, ep) for the dense group, dp for the expert.
        let dense = (dp * ep, coords.dp * ep + coords.ep);
        let expert = (dp, coords.dp);
        let (mut rows, mut full_rows, mut index, mut list) =
            (Vec::new(), Vec::new(), HashMap::new(), Vec::new());
        let mut err = None;
        visit_distinct(params, &mut |name, t, role| {
            let is_expert = role == ParamRole::ExpertBank;
            let (size, rank) = if is_expert { expert } else { dense };
            let r = chunk(t.dims()[0], size, rank);
            index.insert(name.to_string(), rows.len());
            rows.push((r, is_expert));
            full_rows.push(t.dims()[0]);
            match t.narrow(0, r.start, r.len).and_then(|x| x.deep_copy()) {
                Ok(x) => list.push((name.to_string(), x, role)),
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        Ok(StageShards {
            rows,
            full_rows,
            index,
            params: list,
            dense,
            expert,
            rows_only,
            gatherer: None,
        })
    }

    /// The full dim-0 rows of parameter `name` (its gradient's), if sharded here.
    pub(crate) fn full_rows_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).map(|&i| self.full_rows[i])
    }

    /// Where each parameter's rows are, for a [`RowGatherer`].
    fn placements(&self) -> HashMap<String, super::zero3::Placement> {
        self.index
            .iter()
            .map(|(name, &i)| {
                let (rows, expert) = self.rows[i];
                (name.clone(), (rows, expert, self.full_rows[i]))
            })
            .collect()
    }

    /// Makes every tensor of `params` (every chunk: a tensor two chunks hold too) this
    /// rank's rows of it, the handles the optimizer updates.
    pub(super) fn install_rows(&self, params: &mut BTreeMap<usize, ChunkParams>) {
        for cp in params.values_mut() {
            cp.visit_mut(&mut |n, t, _| {
                if let Some(&i) = self.index.get(n) {
                    *t = self.params[i].1.clone();
                }
            });
        }
    }

    /// An optimizer over the rows.
    pub(crate) fn optimizer(&self, plan: &OptimPlan) -> Result<Optimizer> {
        Ok(Optimizer::new(plan, &mut |f| {
            self.params.iter().for_each(|(n, t, r)| f(n, t, *r))
        })?)
    }

    /// The group sharding a parameter, checked against the sizes the rows were cut for.
    fn group<'a>(&self, groups: &PipelineGroups<'a>, expert: bool) -> Result<&'a dyn Communicator> {
        let (comm, want) = if expert {
            (groups.expert_dp, self.expert)
        } else {
            (groups.dense_dp, self.dense)
        };
        if (comm.size(), comm.rank()) != want {
            return Err(Error::TrainConfig {
                field: "parallel.fsdp",
                value: format!("rank {} of {}", comm.rank(), comm.size()),
                rule: format!(
                    "a stage's rows were cut for rank {} of a data-parallel group of {}",
                    want.1, want.0
                ),
            });
        }
        Ok(comm)
    }

    /// Reduce-scatters every gradient of `grads` (whole, this rank's schedule run) into
    /// this rank's rows: sum in rank order, × 1/`replicas`. Every collective is started
    /// before the first is awaited.
    pub(crate) fn reduce_scatter(
        &self,
        groups: &PipelineGroups<'_>,
        grads: &mut [(String, Tensor, ParamRole)],
        replicas: usize,
    ) -> Result<()> {
        let scale = 1.0 / replicas as f32;
        let mut pending: Vec<(usize, Pending, RowShard)> = Vec::new();
        for (i, (name, g, _)) in grads.iter().enumerate() {
            let (rows, expert) = self.rows[self.slot(name)?];
            let comm = self.group(groups, expert)?;
            let padded = pad_rows(g, rows.padded_len * comm.size())?;
            pending.push((i, comm.start_reduce_scatter(&padded, ReduceOp::Sum)?, rows));
        }
        for (i, handle, rows) in pending {
            grads[i].1 = handle.wait()?.narrow(0, 0, rows.len)?.scale(scale)?;
        }
        Ok(())
    }

    /// The optimizer step on the rows (`grads` are rows, clipped), then the updated rows
    /// all-gathered into `params` (with `parallel.fsdp = 3` put there as rows).
    pub(crate) fn step(
        &mut self,
        groups: &PipelineGroups<'_>,
        optimizer: &mut Optimizer,
        grads: &[(String, Tensor, ParamRole)],
        params: &mut BTreeMap<usize, ChunkParams>,
        lr: f64,
    ) -> Result<()> {
        let dense_dp = self.group(groups, false)?;
        let expert_dp = self.group(groups, true)?;
        let mut gather = GroupGather {
            rows: &self.rows,
            full_rows: &self.full_rows,
            index: &self.index,
            dense_dp,
            expert_dp,
            tp: groups.tp,
        };
        let rows = &mut self.params;
        optimizer.step_sharded(
            &mut |f| rows.iter_mut().for_each(|(n, t, r)| f(n, t, *r)),
            &mut |f| grads.iter().for_each(|(n, g, r)| f(n, g, *r)),
            lr,
            &mut gather,
        )?;
        if self.rows_only {
            self.install_rows(params);
            return Ok(());
        }
        let mut pending = Vec::with_capacity(self.params.len());
        for (i, (_, t, _)) in self.params.iter().enumerate() {
            let (r, expert) = self.rows[i];
            let comm = if expert { expert_dp } else { dense_dp };
            pending.push(comm.start_all_gather(&pad_rows(t, r.padded_len)?)?);
        }
        let mut full = HashMap::with_capacity(pending.len());
        for ((name, _, _), handle) in self.params.iter().zip(pending) {
            let rows = self.full_rows[self.index[name]];
            full.insert(name.clone(), handle.wait()?.narrow(0, 0, rows)?);
        }
        visit_distinct_mut(params, &mut |n, t, _| {
            if let Some(x) = full.remove(n) {
                *t = x;
            }
        });
        Ok(())
    }

    /// Visit index of parameter `name`.
    fn slot(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| Error::TrainConfig {
                field: "parallel.fsdp",
                value: name.to_string(),
                rule: "a gradient of the stage has no rows on this rank".to_string(),
            })
    }

    /// `optimizer`'s state (rows) with every tensor all-gathered over its group into the
    /// whole parameter's shape. Collective over the stage's data groups.
    pub(crate) fn full_state(
        &self,
        groups: &PipelineGroups<'_>,
        optimizer: &Optimizer,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut state = Vec::new();
        optimizer.visit_state(&mut |k, t| state.push((k.to_string(), t.clone())));
        let mut out = Vec::with_capacity(state.len());
        for (k, t) in state {
            let i = self.slot(param_of(&k))?;
            let (r, expert) = self.rows[i];
            let all = self
                .group(groups, expert)?
                .all_gather(&pad_rows(&t, r.padded_len)?)?;
            out.push((k, all.narrow(0, 0, self.full_rows[i])?));
        }
        Ok(out)
    }

    /// This rank's rows of whole state tensors (a loaded checkpoint's).
    pub(crate) fn cut_state(&self, state: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        state
            .into_iter()
            .map(|(k, t)| {
                let (r, _) = self.rows[self.slot(param_of(&k))?];
                Ok((k, t.narrow(0, r.start, r.len)?.deep_copy()?))
            })
            .collect()
    }

    /// Re-cuts the rows from whole parameters (after a checkpoint load); with
    /// `parallel.fsdp = 3` `params` then holds the rows.
    pub(crate) fn refresh(&mut self, params: &mut BTreeMap<usize, ChunkParams>) -> Result<()> {
        let mut fresh = HashMap::new();
        let mut err = None;
        visit_distinct(params, &mut |n, t, _| {
            if let Some(&i) = self.index.get(n) {
                let (r, _) = self.rows[i];
                match t.narrow(0, r.start, r.len).and_then(|x| x.deep_copy()) {
                    Ok(x) => {
                        fresh.insert(n.to_string(), x);
                    }
                    Err(e) => err = Some(e),
                }
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        for (n, t, _) in &mut self.params {
            if let Some(x) = fresh.remove(n.as_str()) {
                *t = x;
            }
        }
        if self.rows_only {
            self.install_rows(params);
        }
        Ok(())
    }
}

impl super::pipeline::PipelineRank {
    /// Under `parallel.fsdp = 3`: gathers the stage's rows over `dense_dp` (dense
    /// parameters) and `expert_dp` (expert banks), the stage's data groups, around each
    /// block's forward and backward (the model's hook) and for the tensors outside the
    /// blocks ([`Self::working_params`]). No effect otherwise.
    pub(crate) fn attach_row_gather(
        &mut self,
        dense_dp: Arc<dyn Communicator>,
        expert_dp: Arc<dyn Communicator>,
    ) {
        let Some(sh) = self.shards.as_mut().filter(|s| s.rows_only) else {
            return;
        };
        let gatherer = RowGatherer::new(sh.placements(), dense_dp, expert_dp);
        self.model.set_block_gather(Arc::new(gatherer.clone()));
        sh.gatherer = Some(gatherer);
    }

    /// The stage parameters tensors matching `pick` gathered whole (`parallel.fsdp = 3`),
    /// else the stage parameters as they are. Collective over the stage's data groups.
    fn gathered(
        &self,
        pick: &dyn Fn(&str) -> bool,
    ) -> Result<Cow<'_, BTreeMap<usize, ChunkParams>>> {
        let Some(g) = self.shards.as_ref().and_then(|s| s.gatherer.as_ref()) else {
            return Ok(Cow::Borrowed(&self.params));
        };
        let mut p = self.params.clone();
        g.gather(
            &mut |f| visit_distinct_mut(&mut p, &mut |n, t, _| f(n, t)),
            pick,
        )?;
        share_embedding(&mut p);
        Ok(Cow::Owned(p))
    }

    /// What the stages run with: under `parallel.fsdp = 3` the rows with the tensors
    /// outside the blocks gathered (the blocks gather theirs through the model's hook);
    /// else the stage parameters. Collective over the stage's data groups.
    pub(super) fn working_params(&self) -> Result<Cow<'_, BTreeMap<usize, ChunkParams>>> {
        self.gathered(&outside_blocks)
    }

    /// Every stage parameter whole (checkpoints): under `parallel.fsdp = 3` the rows
    /// all-gathered. Collective over the stage's data groups.
    pub(crate) fn whole_params(&self) -> Result<Cow<'_, BTreeMap<usize, ChunkParams>>> {
        self.gathered(&|_| true)
    }

    /// The full dim-0 rows of the gradient of stage parameter `name` where the parameter
    /// holds fewer (`parallel.fsdp = 3`).
    pub(super) fn grad_rows(&self, name: &str) -> Option<usize> {
        self.shards
            .as_ref()
            .filter(|s| s.rows_only)
            .and_then(|s| s.full_rows_of(name))
    }

    /// Elements of the optimizer state this rank holds (under `parallel.fsdp` 1/2 its rows
    /// of every state tensor only).
    pub fn optimizer_state_elements(&self) -> u64 {
        let mut n = 0u64;
        self.optimizer
            .visit_state(&mut |_, t| n += t.numel() as u64);
        n
    }
}
