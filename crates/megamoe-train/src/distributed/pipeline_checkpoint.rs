//! Checkpoints of pipeline ranks, in the one-rank layout, without a whole-model replica.
//!
//! Save (collective over the world, at the same step on every rank):
//! ```text
//! owned tensors     each rank of the first data rank's pipelines (dp 0) takes the
//!                   parameters, expert biases and optimizer state it owns (the lowest
//!                   pipeline rank holding them); expert banks and their state are
//!                   all-gathered over the stage's EP group (rank order = expert order)
//! to rank 0         pipeline ranks 1.. of data rank (dp 0, ep 0) send theirs to pipeline
//!                   rank 0 (world rank 0): a name/shape list, then the values
//! one-rank layout   rank 0 orders them as one rank's model and optimizer and writes
//! ```
//! Load: rank 0 reads and verifies the checkpoint against the one-rank shapes of every
//! stage's tensors ([`PipelineTensors`]), then sends each tensor only to the ranks whose
//! stages hold it (every data / expert rank at those pipeline coordinates); each keeps
//! it (its experts' rows of an expert bank), so no rank but the reader ever receives or
//! holds more of the model than its stages.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use megamoe_comm::Communicator;
use megamoe_model::ChunkParams;
use megamoe_optim::ParamRole;
use megamoe_tensor::{DType, Device, Tensor};

use super::pipeline::{visit_distinct, PipelineRank};
use super::pipeline_tensors::{
    param_of, recv_bytes, send_bytes, visit_chunk_buffers, PipelineTensors,
};
use crate::checkpoint::{NamedTensor, TensorSpec};
use crate::error::{Error, Result};
use crate::trainer::Trainer;

/// Tag of checkpoint messages between pipeline ranks.
const CHECKPOINT_TAG: u32 = 8;

/// Tag of the tensors rank 0 sends to the ranks holding them when a checkpoint loads.
const LOAD_TAG: u32 = 9;

/// Bytes a checkpoint load sends before every rank synchronises (bounds what rank 0 has
/// in flight).
const LOAD_WINDOW: usize = 64 << 20;

/// A checkpoint's model and optimizer tensors.
type Tensors = (Vec<NamedTensor>, Vec<NamedTensor>);

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
    /// The parameters, buffers and optimizer state this rank owns, expert banks gathered
    /// over `ep` (collective over it); `state` is the optimizer state in whole-parameter
    /// shapes when the optimizer holds rows (`pipeline_fsdp`).
    fn owned_tensors(
        &self,
        params: &BTreeMap<usize, ChunkParams>,
        ep: &dyn Communicator,
        tp: Option<&dyn Communicator>,
        state: Option<Vec<(String, Tensor)>>,
    ) -> Result<Tensors> {
        let mine = |n: &str| self.tensors.owner(n) == Some(self.rank);
        let mut model: Vec<(String, Tensor)> = Vec::new();
        visit_distinct(params, &mut |n, t, _| {
            if mine(n) {
                model.push((n.to_string(), t.clone()));
            }
        });
        for cp in self.params.values() {
            visit_chunk_buffers(cp, &mut |n, t| {
                if mine(n) {
                    model.push((n.to_string(), t.clone()));
                }
            });
        }
        let mut optimizer: Vec<(String, Tensor)> = Vec::new();
        match state {
            Some(whole) => optimizer.extend(whole.into_iter().filter(|(k, _)| mine(k))),
            None => self.optimizer.visit_state(&mut |k, t| {
                if mine(k) {
                    optimizer.push((k.to_string(), t.clone()));
                }
            }),
        }
        let experts = self.tensors.experts();
        let full = |list: Vec<(String, Tensor)>| -> Result<Vec<NamedTensor>> {
            list.into_iter()
                .map(|(n, t)| {
                    let t = super::pipeline_tp::gather_tp(tp, &n, t)?;
                    let t = if ep.size() > 1 && experts.contains(param_of(&n)) {
                        ep.all_gather(&t)?
                    } else {
                        t
                    };
                    NamedTensor::from_tensor(n, &t)
                })
                .collect()
        };
        Ok((full(model)?, full(optimizer)?))
    }

    /// This rank's part of a checkpoint save (see the module doc): the one-rank model and
    /// optimizer tensors on world rank 0 (pipeline rank 0 of data rank 0), `None` on
    /// every other rank. Collective over the world's dp-0 ranks (`groups.pp` is this
    /// rank's pipeline group, `ep` its stage's EP group), and over every data rank first
    /// when the optimizer holds rows (`pipeline_fsdp`: the state is gathered whole).
    pub(crate) fn gather_checkpoint(
        &self,
        groups: &super::pipeline::PipelineGroups<'_>,
        ep: &dyn Communicator,
    ) -> Result<Option<Tensors>> {
        let pp = groups.pp;
        let state = match &self.shards {
            Some(sh) => Some(sh.full_state(groups, &self.optimizer)?),
            None => None,
        };
        // fsdp 3: the stage parameters are rows; gathered whole (collective, every data rank).
        let params = self.whole_params()?;
        if self.coords.dp != 0 {
            return Ok(None);
        }
        let (model, optimizer) = self.owned_tensors(&params, ep, groups.tp, state)?;
        if self.coords.ep != 0 || self.coords.tp != 0 {
            return Ok(None);
        }
        if self.rank != 0 {
            send_tensors(pp, &model)?;
            send_tensors(pp, &optimizer)?;
            return Ok(None);
        }
        let mut got: HashMap<String, NamedTensor> = HashMap::new();
        got.extend(model.into_iter().map(|t| (t.name.clone(), t)));
        got.extend(optimizer.into_iter().map(|t| (t.name.clone(), t)));
        for r in 1..pp.size() {
            for _ in 0..2 {
                got.extend(
                    recv_tensors(pp, r)?
                        .into_iter()
                        .map(|t| (t.name.clone(), t)),
                );
            }
        }
        let (model_specs, optim_specs) = self.one_rank_specs(ep.size());
        let mut take = |specs: Vec<TensorSpec>| -> Result<Vec<NamedTensor>> {
            specs
                .into_iter()
                .map(|s| match got.remove(&s.name) {
                    Some(t) if t.shape == s.shape => Ok(t),
                    Some(t) => Err(gather_error(
                        &s.name,
                        &format!("came as {:?}, not {:?}", t.shape, s.shape),
                    )),
                    None => Err(gather_error(&s.name, "no pipeline rank sent it")),
                })
                .collect()
        };
        let model = take(model_specs)?;
        let optimizer = take(optim_specs)?;
        Ok(Some((model, optimizer)))
    }

    /// Takes this rank's tensors of a one-rank checkpoint: every tensor of the
    /// checkpoint (the model's, then the optimizer's, in
    /// [`PipelineTensors::checkpoint_specs`] order) is sent by world rank 0 (`file` holds
    /// them there) to the ranks whose stages hold it — every world rank at those pipeline
    /// coordinates, `ranks_at[p]` for pipeline rank p — and nowhere else; each keeps its
    /// experts' rows of an expert bank (`ep` = (ep rank, ep)). The ranks synchronise
    /// every [`LOAD_WINDOW`] bytes sent, so rank 0's sends in flight stay bounded. Then
    /// continues after step `step` with `optimizer_steps` updates taken. Collective over
    /// `world`; on an error nothing changes.
    pub(crate) fn load_checkpoint(
        &mut self,
        world: &dyn Communicator,
        ranks_at: &[Vec<usize>],
        file: &HashMap<String, NamedTensor>,
        ep: (usize, usize),
        optimizer_steps: u64,
        step: u64,
    ) -> Result<()> {
        let (model_specs, optim_specs) = self.one_rank_specs(ep.1);
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
        let experts = self.tensors.experts();
        let mut kept: HashMap<String, Tensor> = HashMap::new();
        let me = world.rank();
        let mut in_flight = 0usize;
        for s in model_specs.iter().chain(&optim_specs) {
            let targets: Vec<usize> = self
                .tensors
                .held_by(&s.name)
                .iter()
                .filter_map(|&p| ranks_at.get(p))
                .flatten()
                .copied()
                .collect();
            let got = if me == 0 {
                let full = file
                    .get(&s.name)
                    .ok_or_else(|| gather_error(&s.name, "rank 0's checkpoint must hold it"))?
                    .to_tensor(Device::Cpu)?;
                for &r in targets.iter().filter(|&&r| r != 0) {
                    world.send(&full, r, LOAD_TAG)?;
                }
                targets.contains(&0).then_some(full)
            } else if targets.contains(&me) {
                Some(world.recv(0, LOAD_TAG, &s.shape, DType::F32)?)
            } else {
                None
            };
            in_flight += s.shape.iter().product::<usize>() * 4 * targets.len();
            if in_flight >= LOAD_WINDOW {
                world.barrier()?;
                in_flight = 0;
            }
            let Some(mut t) = got.filter(|_| held.contains(&s.name)) else {
                continue;
            };
            t = self.take_tp_slice(&s.name, t)?;
            if ep.1 > 1 && experts.contains(param_of(&s.name)) {
                let per = s.shape[0] / ep.1;
                t = t.narrow(0, ep.0 * per, per)?.deep_copy()?;
            }
            kept.insert(s.name.clone(), t);
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
            return Err(gather_error(
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

fn gather_error(name: &str, rule: &str) -> Error {
    Error::TrainConfig {
        field: "pipeline checkpoint tensor",
        value: name.to_string(),
        rule: rule.to_string(),
    }
}

/// Sends named tensors to pipeline rank 0: their names and shapes (JSON), then every
/// value in one f32 tensor.
fn send_tensors(pp: &dyn Communicator, list: &[NamedTensor]) -> Result<()> {
    let header: Vec<(&str, &[usize])> = list
        .iter()
        .map(|t| (t.name.as_str(), &t.shape[..]))
        .collect();
    let bytes = serde_json::to_vec(&header).map_err(|e| gather_error("header", &e.to_string()))?;
    send_bytes(pp, &bytes, 0, CHECKPOINT_TAG)?;
    let data: Vec<f32> = list.iter().flat_map(|t| t.data.iter().copied()).collect();
    if !data.is_empty() {
        let n = data.len();
        pp.send(
            &Tensor::from_vec_f32(data, [n], Device::Cpu)?,
            0,
            CHECKPOINT_TAG,
        )?;
    }
    Ok(())
}

/// Receives what [`send_tensors`] sent from pipeline rank `src`.
fn recv_tensors(pp: &dyn Communicator, src: usize) -> Result<Vec<NamedTensor>> {
    let bytes = recv_bytes(pp, src, CHECKPOINT_TAG)?;
    let header: Vec<(String, Vec<usize>)> =
        serde_json::from_slice(&bytes).map_err(|e| gather_error("header", &e.to_string()))?;
    let total: usize = header
        .iter()
        .map(|(_, d)| d.iter().product::<usize>())
        .sum();
    let data = if total == 0 {
        Vec::new()
    } else {
        pp.recv(src, CHECKPOINT_TAG, &[total], megamoe_tensor::DType::F32)?
            .to_host_f32()?
    };
    let mut at = 0;
    Ok(header
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let t = NamedTensor::new(name, shape, data[at..at + n].to_vec());
            at += n;
            t
        })
        .collect())
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
        let world = par.world();
        let (read, state) = super::checkpoint::read_on_rank_zero(
            world,
            path,
            &self.config_toml,
            &model_specs,
            &optim_specs,
        )?;
        let file: HashMap<String, NamedTensor> = read
            .as_ref()
            .map(|c| {
                c.model
                    .iter()
                    .chain(&c.optimizer)
                    .map(|t| (t.name.clone(), t.clone()))
                    .collect()
            })
            .unwrap_or_default();
        // World ranks by pipeline coordinate: the ranks a stage's tensors go to.
        let mut ranks_at = vec![Vec::new(); par.mesh.pp];
        for r in 0..world.size() {
            if let Some(c) = par.mesh.coords(r) {
                if let Some(at) = ranks_at.get_mut(c.pp) {
                    at.push(r);
                }
            }
        }
        rank.load_checkpoint(
            world,
            &ranks_at,
            &file,
            ep,
            state.optimizer_steps,
            state.step,
        )?;
        drop(file);
        self.apply_train_state(&state, started)
    }
}
