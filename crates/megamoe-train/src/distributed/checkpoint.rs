//! Checkpoints of a distributed run in the one-rank layout: replicated tensors are taken
//! as they are, sharded optimizer state (`parallel.fsdp` 1/2) is all-gathered over its
//! sharding group, and expert banks and their optimizer state (sharded over E by expert
//! parallelism) are all-gathered over the EP group in rank order, which is expert order;
//! tensor-parallel slices are all-gathered over the TP group along their split dimension.
//! Rank 0 writes the result; the files are those a one-rank run of the same model writes.
//!
//! Loading is the reverse ([`Trainer::load_checkpoint`] on every rank, collectively):
//! rank 0 reads and verifies the one-rank checkpoint against the one-rank shapes, then
//! broadcasts its scalar state (as JSON) and every tensor; each rank keeps its shard:
//! its experts (rows `ep_rank·E/ep ..` of each bank and of its optimizer state), its
//! `parallel.fsdp` rows of the optimizer state (the FSDP2 `chunk` rule over the
//! parameter's data-parallel group; under `parallel.fsdp = 3` its rows of the parameters
//! too, which become the rows the optimizer updates and the blocks gather). Pipeline
//! ranks, which hold only their stages, save and load through module
//! `pipeline_checkpoint`. A checkpoint written under any layout therefore resumes under
//! any other (resharding is a slice of exact copies).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use megamoe_comm::Communicator;
use megamoe_optim::ParamRole;
use megamoe_plan::chunk;
use megamoe_tensor::{Device, Tensor};

use super::pipeline_tensors::{broadcast_bytes, param_of};
use crate::checkpoint::{
    load_checkpoint, Checkpoint, Expected, NamedTensor, TensorSpec, TrainState,
};
use crate::error::{Error, Result};
use crate::trainer::Trainer;

impl Trainer {
    /// Model and optimizer tensors of a checkpoint, in the one-rank layout. Collective
    /// under expert parallelism: every rank calls it at the same points (rank 0 from
    /// [`Trainer::save_checkpoint`], the others from [`Trainer::join_checkpoint`]).
    pub(crate) fn checkpoint_tensors(&self) -> Result<(Vec<NamedTensor>, Vec<NamedTensor>)> {
        if let (Some(rank), Some(par)) = (self.pipeline.as_ref(), self.parallel.as_ref()) {
            // Gathered from the stages on rank 0; the other ranks' part ends here.
            let got = rank.gather_checkpoint(&par.pipeline_groups(), par.ep.as_ref())?;
            return Ok(got.unwrap_or_default());
        }
        let mut model = self.model_tensors()?;
        let mut optimizer = self.optimizer_tensors()?;
        let Some(par) = self
            .parallel
            .as_ref()
            .filter(|p| p.mesh.ep > 1 || p.mesh.tp > 1 || p.is_sharded())
        else {
            return Ok((model, optimizer));
        };
        let mut experts = HashSet::new();
        let mut index = HashMap::new();
        self.params.visit(&mut |name, t, role| {
            if role == ParamRole::ExpertBank {
                experts.insert(name.to_string());
            }
            let full = par.full_rows(index.len()).unwrap_or(t.dims()[0]);
            index.insert(name.to_string(), (index.len(), full));
        });
        // Sharded optimizer state: this rank's rows (of its TP slice) gathered over the
        // sharding group.
        for t in optimizer.iter_mut() {
            let Some(&(i, rows)) = index.get(param_of(&t.name)) else {
                continue;
            };
            if par.is_sharded() {
                let full = par.gather_rows(i, &t.to_tensor(Device::Cpu)?, rows)?;
                *t = NamedTensor::from_tensor(t.name.clone(), &full)?;
            }
        }
        // Tensor-parallel slices (whole after the row gathers): gathered over the TP group.
        par.gather_tp_slices(&mut model, param_of)?;
        par.gather_tp_slices(&mut optimizer, param_of)?;
        if par.mesh.ep == 1 {
            return Ok((model, optimizer));
        }
        for t in model.iter_mut().chain(optimizer.iter_mut()) {
            if experts.contains(param_of(&t.name)) {
                let full = par.ep.all_gather(&t.to_tensor(Device::Cpu)?)?;
                *t = NamedTensor::from_tensor(t.name.clone(), &full)?;
            }
        }
        Ok((model, optimizer))
    }

    /// A non-writing rank's part of a checkpoint save: the gathers of
    /// [`Trainer::save_checkpoint`] on rank 0 (a pipeline stage's tensors, expert shards,
    /// FSDP rows, TP slices; nothing to do without them).
    pub fn join_checkpoint(&mut self) -> Result<()> {
        if self.pipeline.is_some() {
            self.checkpoint_tensors()?;
            return Ok(());
        }
        if self
            .parallel
            .as_ref()
            .is_some_and(|p| p.mesh.ep > 1 || p.mesh.tp > 1 || p.is_sharded())
        {
            self.checkpoint_tensors()?;
        }
        Ok(())
    }
}

impl Trainer {
    /// [`Trainer::load_checkpoint`] on a rank of a distributed run (see the module doc).
    /// Collective over the world; an error on rank 0 (a missing, corrupt or mismatched
    /// checkpoint) stops every rank.
    pub(crate) fn load_checkpoint_shard(&mut self, path: &Path) -> Result<()> {
        if self.pipeline.is_some() {
            return self.load_pipeline_checkpoint(path);
        }
        let started = Instant::now();
        let Some(par) = self.parallel.as_ref() else {
            return self.load_checkpoint(path);
        };
        let world = par.world();
        let ep = par.mesh.ep;
        let rows_only = par.holds_rows_only();
        // One-rank shapes of every tensor this rank holds a shard of (under fsdp = 3 the
        // parameters are rows: their full dim 0 first).
        let mut experts = HashSet::new();
        let mut full_dims: HashMap<String, Vec<usize>> = HashMap::new();
        let mut index = 0;
        self.params.visit(&mut |name, t, role| {
            let mut dims = t.dims().to_vec();
            if rows_only {
                dims[0] = par.full_rows(index).unwrap_or(dims[0]);
            }
            index += 1;
            if role == ParamRole::ExpertBank {
                experts.insert(name.to_string());
                dims[0] *= ep;
            }
            par.tp_full_dims(name, &mut dims);
            full_dims.insert(name.to_string(), dims);
        });
        let local_model = self.model_tensors()?;
        let local_optim = self.optimizer_tensors()?;
        let full_spec = |t: &NamedTensor| TensorSpec {
            name: t.name.clone(),
            shape: full_dims
                .get(param_of(&t.name))
                .cloned()
                .unwrap_or_else(|| t.spec().shape),
        };
        let model_specs: Vec<TensorSpec> = local_model.iter().map(full_spec).collect();
        let optim_specs: Vec<TensorSpec> = local_optim.iter().map(full_spec).collect();

        // 1. Rank 0 reads the checkpoint; its scalar state reaches every rank.
        let (read, state) =
            read_on_rank_zero(world, path, &self.config_toml, &model_specs, &optim_specs)?;

        // 2. Every tensor from rank 0, cut to this rank's shard.
        let by_name = |list: &[NamedTensor]| -> HashMap<String, NamedTensor> {
            list.iter().map(|t| (t.name.clone(), t.clone())).collect()
        };
        let (file_model, file_optim) = match &read {
            Some(c) => (by_name(&c.model), by_name(&c.optimizer)),
            None => (HashMap::new(), HashMap::new()),
        };
        let ep_rank = par.coords.ep;
        let shard = |spec: &TensorSpec, file: &HashMap<String, NamedTensor>, optim: bool| {
            let full = match file.get(&spec.name) {
                Some(t) => t.to_tensor(Device::Cpu)?,
                None => Tensor::zeros(spec.shape.clone(), megamoe_tensor::DType::F32, Device::Cpu)?,
            };
            let mut t = world.broadcast(&full, 0)?;
            let param = param_of(&spec.name);
            let expert = experts.contains(param);
            if expert && ep > 1 {
                let per = spec.shape[0] / ep;
                t = t.narrow(0, ep_rank * per, per)?;
            }
            t = par.take_tp_slice(param, t)?;
            // Optimizer state rows (fsdp >= 1); under fsdp = 3 the parameter rows too
            // (copied, as at init: the optimizer updates them in place).
            let param_rows = !optim && rows_only && full_dims.contains_key(param);
            if (optim || param_rows) && par.is_sharded() {
                let g: &dyn Communicator = if expert {
                    par.expert_dp.as_ref()
                } else {
                    par.dense_dp.as_ref()
                };
                let rows = chunk(t.dims()[0], g.size(), g.rank());
                t = t.narrow(0, rows.start, rows.len)?;
                if param_rows {
                    t = t.deep_copy()?;
                }
            }
            NamedTensor::from_tensor(spec.name.clone(), &t)
        };
        let model = model_specs
            .iter()
            .map(|s| shard(s, &file_model, false))
            .collect::<Result<Vec<_>>>()?;
        let optimizer = optim_specs
            .iter()
            .map(|s| shard(s, &file_optim, true))
            .collect::<Result<Vec<_>>>()?;
        let ckpt = Checkpoint {
            dir: read.map_or_else(|| path.to_path_buf(), |c| c.dir),
            state,
            model,
            optimizer,
        };
        self.apply_checkpoint(&ckpt, started)?;

        // 3. Derived shards: FSDP rows of the parameters.
        if let Some(par) = self.parallel.as_mut() {
            if par.holds_rows_only() {
                par.adopt_rows(&self.params)?;
            } else if par.is_sharded() {
                par.sharded = Some(par.shard_state(&self.params, false)?);
            }
        }
        Ok(())
    }
}

/// Rank 0 reads and verifies the one-rank checkpoint `path` against `config_toml` and
/// the one-rank tensor specs; its scalar state reaches every rank of `world` (the
/// checkpoint itself stays on rank 0). Collective; an error on rank 0 stops every rank.
pub(super) fn read_on_rank_zero(
    world: &dyn Communicator,
    path: &Path,
    config_toml: &str,
    model: &[TensorSpec],
    optimizer: &[TensorSpec],
) -> Result<(Option<Checkpoint>, TrainState)> {
    let read = if world.rank() == 0 {
        Some(load_checkpoint(
            path,
            &Expected {
                config_toml: Some(config_toml),
                model: Some(model),
                optimizer: Some(optimizer),
            },
        )?)
    } else {
        None
    };
    let state_json = match &read {
        Some(c) => serde_json::to_vec(&c.state).map_err(|e| Error::TrainConfig {
            field: "checkpoint state",
            value: path.display().to_string(),
            rule: format!("must serialise for the other ranks: {e}"),
        })?,
        None => Vec::new(),
    };
    let state_json = broadcast_bytes(world, &state_json, 0)?;
    let state: TrainState =
        serde_json::from_slice(&state_json).map_err(|e| Error::TrainConfig {
            field: "checkpoint state",
            value: path.display().to_string(),
            rule: format!("rank 0's broadcast must parse: {e}"),
        })?;
    Ok((read, state))
}
