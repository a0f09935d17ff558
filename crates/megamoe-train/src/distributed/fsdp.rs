//! Sharded optimizer state and gradients (`parallel.fsdp = 1` or `2`, ZeRO-1/2): every
//! parameter is cut on dim 0 by the FSDP2 `chunk` rule over its data-parallel group (dense
//! parameters over dense_dp, expert banks over expert_dp); a rank keeps the optimizer
//! state of its rows only. After backward each gradient is reduce-scattered (sum, rank
//! order, then × 1/(dp·ep)) into the rank's rows, the optimizer updates the rank's rows,
//! and the updated rows are all-gathered back into the full parameters the next forward
//! uses. Padding rows (the last rank's short chunk) are zeros and are cut after each
//! collective. Under tensor parallelism the rows are those of the rank's TP slice (module
//! `tp`), sharded over the dense data-parallel group, whose ranks hold the same slice.
//!
//! With Muon (distributed Muon, Moonlight Algorithm 1) the optimizer runs
//! [`Optimizer::step_sharded`]: AdamW-routed parameters (embeddings, norms, head, gates,
//! biases) update their rows elementwise as above; each Muon matrix's momentum-updated
//! rows are all-gathered over its sharding group ([`GroupGather`]), every rank runs NS5
//! on the full matrix (same input, same bits) and keeps its rows of the result. Expert
//! banks are cut over E, so a rank's rows are whole expert matrices: NS5 runs on them
//! with no gather.

use std::collections::HashMap;

use megamoe_comm::{Communicator, Pending, ReduceOp};
use megamoe_model::{GradBuffers, ModelParams};
use megamoe_optim::{OptimError, Optimizer, ParamRole, RowGather};
use megamoe_plan::{chunk, RowShard};
use megamoe_tensor::Tensor;

use super::Parallel;
use crate::error::Result;

/// This rank's rows of every parameter and of its gradient.
#[derive(Debug)]
pub(crate) struct ShardedState {
    /// Per parameter (visit order): its row shard and whether it is an expert bank.
    pub(crate) rows: Vec<(RowShard, bool)>,
    /// Per parameter (visit order): its full dim-0 rows.
    pub(crate) full_rows: Vec<usize>,
    /// Visit index of each parameter name.
    pub(crate) index: HashMap<String, usize>,
    /// The rank's rows of every parameter (the optimizer's parameters).
    pub(crate) params: ModelParams,
    /// The rank's rows of every reduced gradient.
    pub(crate) grads: ModelParams,
}

/// `t` with zero rows appended up to `rows` (dim 0).
pub(crate) fn pad_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let have = t.dims()[0];
    if have >= rows {
        return Ok(t.clone());
    }
    let mut dims = t.dims().to_vec();
    dims[0] = rows - have;
    let zeros = Tensor::zeros(dims, t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], 0)?)
}

/// Visits `p`'s tensors in order, replacing each by `f(index, tensor)`.
fn map_params(
    p: &mut ModelParams,
    mut f: impl FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    let mut i = 0;
    let mut err = None;
    p.visit_mut(&mut |_, t, _| {
        if err.is_none() {
            match f(i, t) {
                Ok(new) => *t = new,
                Err(e) => err = Some(e),
            }
        }
        i += 1;
    });
    err.map_or(Ok(()), Err)
}

impl Parallel {
    /// The group a parameter is sharded over.
    fn shard_group(&self, expert: bool) -> &dyn Communicator {
        if expert {
            self.expert_dp.as_ref()
        } else {
            self.dense_dp.as_ref()
        }
    }

    /// Cuts `params` into this rank's rows (no communication: every rank holds the same
    /// full initial parameters).
    /// `copy` copies the rows out of the full tensors (else they are views of them).
    pub(crate) fn shard_state(&self, params: &ModelParams, copy: bool) -> Result<ShardedState> {
        let (mut rows, mut full_rows, mut index) = (Vec::new(), Vec::new(), HashMap::new());
        params.visit(&mut |name, t, role| {
            let expert = role == ParamRole::ExpertBank;
            let g = self.shard_group(expert);
            index.insert(name.to_string(), rows.len());
            rows.push((chunk(t.dims()[0], g.size(), g.rank()), expert));
            full_rows.push(t.dims()[0]);
        });
        let mut local = params.clone();
        map_params(&mut local, |i, t| {
            let r = t.narrow(0, rows[i].0.start, rows[i].0.len)?;
            Ok(if copy { r.deep_copy()? } else { r })
        })?;
        let grads = local.zeros_like()?;
        Ok(ShardedState {
            rows,
            full_rows,
            index,
            params: local,
            grads,
        })
    }

    /// Under `parallel.fsdp = 3`: makes `rows` (this rank's rows of every parameter, as a
    /// loaded checkpoint left them in the trainer) the rows the optimizer updates; the
    /// trainer and the sharded state then share the same handles, as after init.
    pub(crate) fn adopt_rows(&mut self, rows: &ModelParams) -> Result<()> {
        let Some(state) = self.sharded.as_mut() else {
            return Ok(());
        };
        let mut loaded = Vec::new();
        rows.visit(&mut |_, t, _| loaded.push(t.clone()));
        map_params(&mut state.params, |i, t| {
            let new = &loaded[i];
            if new.dims() != t.dims() {
                return Err(crate::error::Error::TrainConfig {
                    field: "checkpoint",
                    value: format!("rows {:?}", new.dims()),
                    rule: format!("must match this rank's parameter rows {:?}", t.dims()),
                });
            }
            Ok(new.clone())
        })
    }

    /// Reduce-scatters every gradient into this rank's rows (sum in rank order, then
    /// × 1/(dp·ep)); every collective is started before the first is awaited.
    pub(crate) fn reduce_scatter_grads(&mut self, grads: &GradBuffers) -> Result<()> {
        let scale = 1.0 / self.data_replicas() as f32;
        let Some(state) = self.sharded.as_ref() else {
            return Ok(());
        };
        let mut pending: Vec<Result<Pending>> = Vec::new();
        let mut i = 0;
        grads.grads().visit(&mut |_, g, _| {
            let (rows, expert) = state.rows[i];
            let comm = self.shard_group(expert);
            let full = rows.padded_len * comm.size();
            pending.push(
                pad_rows(g, full).and_then(|p| Ok(comm.start_reduce_scatter(&p, ReduceOp::Sum)?)),
            );
            i += 1;
        });
        let mut reduced = Vec::with_capacity(pending.len());
        for (p, (rows, _)) in pending.into_iter().zip(&state.rows) {
            reduced.push(p?.wait()?.narrow(0, 0, rows.len)?.scale(scale)?);
        }
        if let Some(state) = self.sharded.as_mut() {
            map_params(&mut state.grads, |i, _| Ok(reduced[i].clone()))?;
        }
        Ok(())
    }

    /// The optimizer step on this rank's rows, then the updated rows all-gathered into the
    /// full `params`.
    pub(crate) fn sharded_optimizer_step(
        &mut self,
        optimizer: &mut Optimizer,
        params: &mut ModelParams,
        lr: f64,
    ) -> Result<()> {
        let Parallel {
            sharded,
            dense_dp,
            expert_dp,
            tp,
            mesh,
            ..
        } = self;
        let Some(state) = sharded.as_mut() else {
            return Ok(());
        };
        let mut gather = GroupGather {
            rows: &state.rows,
            full_rows: &state.full_rows,
            index: &state.index,
            dense_dp: dense_dp.as_ref(),
            expert_dp: expert_dp.as_ref(),
            tp: (mesh.tp > 1).then_some(tp.as_ref()),
        };
        let grads = &state.grads;
        optimizer.step_sharded(
            &mut |f| state.params.visit_mut(f),
            &mut |f| grads.visit(f),
            lr,
            &mut gather,
        )?;
        let state = self.sharded.as_ref().map(|s| (&s.rows, &s.params));
        let Some((rows, local)) = state else {
            return Ok(());
        };
        if self.rows_only {
            // ZeRO-3: the model runs on the updated rows themselves (shared handles).
            let mut rows_now = Vec::new();
            local.visit(&mut |_, t, _| rows_now.push(t.clone()));
            return map_params(params, |i, _| Ok(rows_now[i].clone()));
        }
        let mut pending: Vec<Result<Pending>> = Vec::new();
        let mut i = 0;
        local.visit(&mut |_, t, _| {
            let (r, expert) = rows[i];
            pending.push(
                pad_rows(t, r.padded_len)
                    .and_then(|p| Ok(self.shard_group(expert).start_all_gather(&p)?)),
            );
            i += 1;
        });
        let mut gathered = Vec::with_capacity(pending.len());
        for p in pending {
            gathered.push(p?.wait()?);
        }
        map_params(params, |i, t| Ok(gathered[i].narrow(0, 0, t.dims()[0])?))
    }

    /// The full dim-0 rows of parameter `index` (visit order) when sharded.
    pub(crate) fn full_rows(&self, index: usize) -> Option<usize> {
        self.sharded.as_ref()?.full_rows.get(index).copied()
    }

    /// Whether optimizer state and gradients are sharded (`parallel.fsdp` 1, 2 or 3).
    pub(crate) fn is_sharded(&self) -> bool {
        self.sharded.is_some()
    }

    /// Σ g² of this rank's gradient rows, dense and expert parts each summed over the group
    /// that shards them, so every row counts once; the rows of tensor-parallel slices are
    /// then summed over the TP group too (each TP rank holds a different slice; the
    /// replicated parameters' rows are the same on every TP rank and count once).
    pub(crate) fn sharded_grad_squares(&self) -> Result<Option<(Tensor, Tensor)>> {
        let Some(state) = self.sharded.as_ref() else {
            return Ok(None);
        };
        let (mut dense, mut expert, mut tp_slices) = (Vec::new(), Vec::new(), Vec::new());
        let mut err = None;
        let mut i = 0;
        state.grads.visit(&mut |name, g, _| {
            let is_expert = state.rows[i].1;
            i += 1;
            if err.is_some() {
                return;
            }
            match g.sum_squares().and_then(|s| s.reshape([1])) {
                Ok(s) if is_expert => expert.push(s),
                Ok(s) if self.is_tp_slice(name) => tp_slices.push(s),
                Ok(s) => dense.push(s),
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        let sum = |parts: &[Tensor], comm: &dyn Communicator| -> Result<Tensor> {
            let local = if parts.is_empty() {
                Tensor::from_vec_f32(vec![0.0], [1], megamoe_tensor::Device::Cpu)?
            } else {
                let refs: Vec<&Tensor> = parts.iter().collect();
                Tensor::cat(&refs, 0)?.sum_all()?.reshape([1])?
            };
            Ok(comm.all_reduce(&local, ReduceOp::Sum)?)
        };
        let mut dense = sum(&dense, self.dense_dp.as_ref())?;
        if !tp_slices.is_empty() {
            let slices = sum(&tp_slices, self.dense_dp.as_ref())?;
            dense = dense.add(&self.tp_sum(&slices)?)?;
        }
        Ok(Some((dense, sum(&expert, self.expert_dp.as_ref())?)))
    }
}

/// Distributed Muon's gather: a matrix's rows all-gathered over the group that shards it
/// (dense_dp), padding cut; under tensor parallelism a TP slice's gathered rows are then
/// all-gathered over the TP group along its split dimension (the one-rank matrix). Expert
/// banks (whole matrices per rank) and parameters neither sharded nor sliced are not
/// gathered.
pub(crate) struct GroupGather<'a> {
    pub(crate) rows: &'a [(RowShard, bool)],
    pub(crate) full_rows: &'a [usize],
    pub(crate) index: &'a HashMap<String, usize>,
    pub(crate) dense_dp: &'a dyn Communicator,
    pub(crate) expert_dp: &'a dyn Communicator,
    /// The TP group when tp > 1.
    pub(crate) tp: Option<&'a dyn Communicator>,
}

impl GroupGather<'_> {
    /// The TP group and split dimension of parameter `name` when it is a TP slice.
    fn tp_split(&self, name: &str) -> Option<(&dyn Communicator, usize)> {
        Some((self.tp?, megamoe_model::tp::tp_split_dim(name)?))
    }
}

impl RowGather for GroupGather<'_> {
    fn gather_rows(
        &mut self,
        name: &str,
        local: &Tensor,
    ) -> megamoe_optim::Result<Option<(Tensor, RowShard)>> {
        let Some(&i) = self.index.get(name) else {
            return Err(OptimError::UnknownParam {
                name: name.to_string(),
            });
        };
        let (rows, expert) = self.rows[i];
        let comm = if expert {
            self.expert_dp
        } else {
            self.dense_dp
        };
        let split = self.tp_split(name);
        if expert || (comm.size() == 1 && split.is_none()) {
            return Ok(None);
        }
        let failed = |e: Box<dyn std::error::Error + Send + Sync>| OptimError::Gather {
            name: name.to_string(),
            source: e,
        };
        let padded = pad_rows(local, rows.padded_len).map_err(|e| failed(Box::new(e)))?;
        let all = comm.all_gather(&padded).map_err(|e| failed(Box::new(e)))?;
        let slice = all.narrow(0, 0, self.full_rows[i])?;
        let Some((tp, dim)) = split else {
            return Ok(Some((slice, rows)));
        };
        let whole = super::tp::gather_along(tp, &slice, dim).map_err(|e| failed(Box::new(e)))?;
        Ok(Some((whole, rows)))
    }

    fn keep(&mut self, name: &str, o: &Tensor, rows: RowShard) -> megamoe_optim::Result<Tensor> {
        let o = match self.tp_split(name) {
            Some((tp, dim)) => {
                let per = o.dims()[dim] / tp.size();
                o.narrow(dim, tp.rank() * per, per)?
            }
            None => o.clone(),
        };
        Ok(o.narrow(0, rows.start, rows.len)?)
    }
}
