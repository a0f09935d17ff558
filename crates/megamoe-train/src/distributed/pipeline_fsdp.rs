//! FSDP inside a pipeline stage (`parallel.fsdp` 1 or 2 with `parallel.pp`, ZeRO-1/2 over
//! each stage's data-parallel group): a pipeline rank's optimizer holds the state of its
//! dim-0 rows only (the FSDP2 `chunk` rule; dense parameters over the stage's dense
//! data-parallel group of dp·ep ranks, expert banks over its expert one of dp ranks), as
//! module `fsdp` does without a pipeline.
//!
//! ```text
//! after the schedule   each distinct gradient reduce-scattered into the rank's rows
//!                      (sum in rank order, × 1/(dp·ep)) instead of all-reduced
//! clip                 every data rank counts its rows (the lowest pp rank holding a
//!                      tensor still owns it), all-reduced over the world
//! optimizer            AdamW on the rows; Muon gathers each matrix's rows over its group,
//!                      runs NS5 on the whole matrix and keeps its rows (`fsdp::GroupGather`)
//! after the optimizer  the updated rows all-gathered into the stage parameters the next
//!                      schedule run, evaluation and sampling read
//! checkpoints          the rows of every state tensor gathered over the group before the
//!                      stage's tensors go to rank 0; a load cuts the rows again
//! ```
//! Parameters stay whole between steps (`parallel.fsdp = 3` with `pp` is refused).

use std::collections::{BTreeMap, HashMap};

use megamoe_comm::{Communicator, Pending, ReduceOp};
use megamoe_model::ChunkParams;
use megamoe_optim::{Optimizer, ParamRole};
use megamoe_plan::{chunk, OptimPlan, RankCoords, RowShard};
use megamoe_tensor::Tensor;

use super::fsdp::{pad_rows, GroupGather};
use super::pipeline::{visit_distinct, visit_distinct_mut, PipelineGroups};
use super::pipeline_tensors::param_of;
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
}

impl StageShards {
    /// Cuts `params` (every rank of a stage's data groups holds the same initial values)
    /// into the rows of the rank at `coords` in a mesh of `dp` × `ep` data ranks.
    pub(crate) fn new(
        params: &BTreeMap<usize, ChunkParams>,
        coords: RankCoords,
        dp: usize,
        ep: usize,
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
        })
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
    /// all-gathered into `params`.
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

    /// Re-cuts the rows from whole parameters (after a checkpoint load).
    pub(crate) fn refresh(&mut self, params: &BTreeMap<usize, ChunkParams>) -> Result<()> {
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
        Ok(())
    }
}

impl super::pipeline::PipelineRank {
    /// Elements of the optimizer state this rank holds (under `parallel.fsdp` 1/2 its rows
    /// of every state tensor only).
    pub fn optimizer_state_elements(&self) -> u64 {
        let mut n = 0u64;
        self.optimizer
            .visit_state(&mut |_, t| n += t.numel() as u64);
        n
    }
}
