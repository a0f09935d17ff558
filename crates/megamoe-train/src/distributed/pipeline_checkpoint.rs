//! Checkpoints of pipeline ranks, sharded (module `distributed::checkpoint`), without a
//! whole-model replica.
//!
//! Save: every rank describes the pieces of its stages — the parameters, expert biases
//! and optimizer state of its chunks (a tensor mirrored on two stages once per rank),
//! its experts' rows of an expert bank, its TP slice of a split matrix; under
//! `parallel.fsdp` 1/2/3 the optimizer state (and with 3 the parameters) is first
//! all-gathered over the stage's data group into whole-parameter shapes. The lowest world rank holding a box writes it.
//! Load: rank 0 verifies the checkpoint against the one-rank shapes of every stage's
//! tensors ([`PipelineTensors`]); every rank then reads only the boxes of the tensors
//! its stages hold, so no rank reads or holds more of the model than its stages.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use megamoe_model::tp::tp_split_dim;
use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use super::checkpoint::{shard_error, HeldTensors};
use super::pipeline::{visit_distinct, PipelineGroups, PipelineRank};
use super::pipeline_tensors::{param_of, visit_chunk_buffers, PipelineTensors};
use crate::checkpoint::{ShardReader, Slab, TensorSet, TensorSpec};
use crate::error::{Error, Result};
use crate::trainer::Trainer;

impl PipelineTensors {
    /// The one-rank checkpoint specs of the model (parameters, then buffers) and of the
    /// optimizer state, in one rank's order: expert banks and their state have `ep` times
    /// this rank's rows.
    pub(crate) fn checkpoint_specs(&self, ep: usize) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let params = self.params();
        let experts: HashSet<&str> = params
            .iter()
            .filter(|p| p.role == ParamRole::ExpertBank)
            .map(|p| p.name.as_str())
            .collect();
        let spec = |name: &str, dims: &[usize]| {
            let mut shape = dims.to_vec();
            if experts.contains(param_of(name)) {
                if let Some(rows) = shape.first_mut() {
                    *rows *= ep;
                }
            }
            TensorSpec {
                name: name.to_string(),
                shape,
            }
        };
        let (buffers, state) = self.buffers_and_state();
        let model = params
            .iter()
            .map(|p| spec(&p.name, &p.dims))
            .chain(buffers.iter().map(|(n, d)| spec(n, d)))
            .collect();
        let optimizer = state.iter().map(|(n, d)| spec(n, d)).collect();
        (model, optimizer)
    }

    /// Names of the expert banks.
    fn experts(&self) -> HashSet<String> {
        self.params()
            .into_iter()
            .filter(|p| p.role == ParamRole::ExpertBank)
            .map(|p| p.name)
            .collect()
    }
}

impl PipelineRank {
    /// One-rank shapes of every tensor of the model (by name) and which set it is in.
    fn one_rank_shapes(&self, ep: usize) -> HashMap<String, (TensorSet, Vec<usize>)> {
        let (model, optimizer) = self.one_rank_specs(ep);
        let tag = |set| move |s: TensorSpec| (s.name, (set, s.shape));
        model
            .into_iter()
            .map(tag(TensorSet::Model))
            .chain(optimizer.into_iter().map(tag(TensorSet::Optimizer)))
            .collect()
    }

    /// The box this rank holds of tensor `name` of one-rank shape `global`: its experts'
    /// rows of an expert bank (`ep` = (ep rank, ep)), its TP slice of a split matrix.
    fn slab_of(&self, name: &str, global: &[usize], ep: (usize, usize), expert: bool) -> Slab {
        let mut slab = Slab::whole(global);
        if ep.1 > 1 && expert && !global.is_empty() {
            let per = global[0] / ep.1;
            slab = slab.narrow(0, ep.0 * per, per);
        }
        let tp = self.plan.parallel.tp.max(1);
        if let Some(d) = tp_split_dim(param_of(name)).filter(|&d| tp > 1 && d < global.len()) {
            let per = global[d] / tp;
            slab = slab.narrow(d, self.coords.tp * per, per);
        }
        slab
    }

    /// The pieces this rank's stages hold and their values (see the module doc). Under
    /// `parallel.fsdp` 1/2/3 collective over the stage's data groups (the state, with 3
    /// the parameters too, gathered whole).
    pub(crate) fn held_pieces(
        &self,
        groups: &PipelineGroups<'_>,
        ep: (usize, usize),
    ) -> Result<HeldTensors> {
        let shapes = self.one_rank_shapes(ep.1);
        let experts = self.tensors.experts();
        // fsdp 3: the stage parameters are rows, gathered whole to be written (collective
        // over the stage's data groups).
        let whole = self.whole_params()?;
        let params = &*whole;
        let mut model: Vec<(String, Tensor)> = Vec::new();
        visit_distinct(params, &mut |n, t, _| {
            model.push((n.to_string(), t.clone()))
        });
        for cp in params.values() {
            visit_chunk_buffers(cp, &mut |n, t| model.push((n.to_string(), t.clone())));
        }
        let optimizer: Vec<(String, Tensor)> = match &self.shards {
            Some(sh) => sh.full_state(groups, &self.optimizer)?,
            None => {
                let mut v = Vec::new();
                self.optimizer
                    .visit_state(&mut |k, t| v.push((k.to_string(), t.clone())));
                v
            }
        };
        let mut held = HeldTensors::default();
        for (set, list) in [(TensorSet::Model, model), (TensorSet::Optimizer, optimizer)] {
            for (name, t) in list {
                let Some((_, global)) = shapes.get(&name) else {
                    return Err(shard_error(
                        &name,
                        "the pipeline's tensor list must hold it",
                    ));
                };
                let expert = experts.contains(param_of(&name));
                let slab = self.slab_of(&name, global, ep, expert);
                held.push(set, &name, global.clone(), slab, &t, true)?;
            }
        }
        Ok(held)
    }

    /// Takes this rank's tensors of the checkpoint `reader` reads: every tensor its
    /// stages hold, its box only (its experts' rows, its TP slice); then continues after
    /// step `step` with `optimizer_steps` updates taken. On an error nothing changes.
    pub(crate) fn load_from(
        &mut self,
        reader: &ShardReader,
        ep: (usize, usize),
        optimizer_steps: u64,
        step: u64,
    ) -> Result<()> {
        let shapes = self.one_rank_shapes(ep.1);
        let experts = self.tensors.experts();
        let mut held: HashSet<String> = HashSet::new();
        for cp in self.params.values() {
            cp.visit(&mut |n, _, _| {
                held.insert(n.to_string());
            });
            visit_chunk_buffers(cp, &mut |n, _| {
                held.insert(n.to_string());
            });
        }
        held.extend(self.optimizer.state_keys());
        let mut kept: HashMap<String, Tensor> = HashMap::new();
        for name in &held {
            let Some((set, global)) = shapes.get(name) else {
                return Err(shard_error(name, "the pipeline's tensor list must hold it"));
            };
            let slab = self.slab_of(name, global, ep, experts.contains(param_of(name)));
            let data = reader.read(*set, name, &slab)?;
            let t = Tensor::from_vec_f32(data, slab.shape.clone(), megamoe_tensor::Device::Cpu)?;
            // Stored bf16 (bf16 AdamW moments) comes back bf16, bit for bit.
            let t = match reader.dtype(*set, name)? {
                megamoe_tensor::DType::BF16 => t.to_dtype(megamoe_tensor::DType::BF16)?,
                _ => t,
            };
            kept.insert(name.clone(), t);
        }
        let mut params = self.params.clone();
        let mut missing = None;
        let mut put = |n: &str, t: &mut Tensor| match kept.get(n) {
            Some(x) => *t = x.clone(),
            None => missing = Some(n.to_string()),
        };
        for cp in params.values_mut() {
            cp.visit_mut(&mut |n, t, _| put(n, t));
            let offset = cp.layer_offset;
            for (i, l) in cp.layers.iter_mut().enumerate() {
                l.mlp
                    .visit_buffers_mut(&format!("model.layers.{}.mlp", offset + i), &mut |n, t| {
                        put(n, t)
                    });
            }
        }
        if let Some(name) = missing {
            return Err(shard_error(
                &name,
                "the checkpoint must hold every tensor of the stage",
            ));
        }
        let state = self
            .optimizer
            .state_keys()
            .into_iter()
            .filter_map(|k| kept.remove(&k).map(|t| (k, t)))
            .collect::<Vec<_>>();
        let state = match &self.shards {
            Some(sh) => sh.cut_state(state)?,
            None => state,
        };
        let mut optimizer = self.optimizer.clone();
        optimizer.load_state(optimizer_steps, state)?;
        if let Some(sh) = self.shards.as_mut() {
            sh.refresh(&mut params)?;
        }
        self.params = params;
        self.optimizer = optimizer;
        self.step = step;
        Ok(())
    }

    /// Updates this rank's optimizer has applied.
    pub(crate) fn optimizer_steps(&self) -> u64 {
        self.optimizer.steps_taken()
    }
}

impl Trainer {
    /// [`Trainer::load_checkpoint`] on a pipeline rank (see the module doc). Collective
    /// over the world.
    pub(crate) fn load_pipeline_checkpoint(&mut self, path: &Path) -> Result<()> {
        let started = Instant::now();
        let (Some(par), Some(rank)) = (self.parallel.as_ref(), self.pipeline.as_mut()) else {
            return Err(Error::TrainConfig {
                field: "parallel.pp",
                value: self.plan.parallel.pp.to_string(),
                rule: "a pipeline checkpoint load needs the rank's stages and groups".into(),
            });
        };
        let ep = (par.coords.ep, par.mesh.ep);
        let (model_specs, optim_specs) = rank.one_rank_specs(ep.1);
        let (dir, state) = super::checkpoint::open_on_rank_zero(
            par.world(),
            path,
            &self.config_toml,
            &model_specs,
            &optim_specs,
        )?;
        let reader = ShardReader::open(&dir)?;
        rank.load_from(&reader, ep, state.optimizer_steps, state.step)?;
        self.apply_train_state(&state, started)
    }
}
