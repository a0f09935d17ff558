//! Which tensors every model stage of a pipeline holds, known on each pipeline rank
//! without holding them: [`PipelineTensors`] lists, per model stage, its parameters
//! (name, shape, role), buffers (expert biases) and optimizer-state tensors, exchanged
//! once when the ranks are built (each stage's list comes from the lowest rank holding
//! it). A rank materialises only its own stages; this directory is what the rest needs:
//! - the gradient norm's slots in one rank's order (the lowest holder of a tensor counts
//!   it),
//! - a checkpoint's tensors in the one-rank layout (each owner sends its own to rank 0,
//!   and on load every rank knows every tensor's shape to take its part),
//! - the model's parameter count for the run header and MFU.
//!
//! Shapes are this rank's: under expert parallelism an expert bank holds `E/ep` experts
//! (the same on every rank of a pipeline).

use std::collections::{BTreeMap, HashMap, HashSet};

use megamoe_comm::Communicator;
use megamoe_model::ChunkParams;
use megamoe_optim::{Optimizer, ParamRole, STATE_KINDS};
use megamoe_plan::StageMap;
use megamoe_tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Every [`ParamRole`], indexed by the code the exchange sends.
const ROLES: [ParamRole; 8] = [
    ParamRole::Matrix,
    ParamRole::ExpertBank,
    ParamRole::Embedding,
    ParamRole::Head,
    ParamRole::Norm,
    ParamRole::Bias,
    ParamRole::Gate,
    ParamRole::Scalar,
];

fn role_code(role: ParamRole) -> u8 {
    ROLES.iter().position(|&r| r == role).unwrap_or(0) as u8
}

/// A buffer or optimizer-state tensor: (name, shape).
pub(crate) type NamedShape = (String, Vec<usize>);

/// The tensors of one model stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct StageTensors {
    /// Parameters in [`ChunkParams::visit`] order: (global name, shape, role code).
    params: Vec<(String, Vec<usize>, u8)>,
    /// Buffers (expert biases): (global name, shape).
    buffers: Vec<NamedShape>,
    /// The optimizer state of the parameters: (`<kind>.<parameter>`, shape).
    state: Vec<NamedShape>,
}

/// A parameter of the directory.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParamEntry {
    pub name: String,
    pub dims: Vec<usize>,
    pub role: ParamRole,
}

impl StageTensors {
    /// The lists of a model stage this rank holds: its parameters and buffers, and the
    /// state `optimizer` keeps for them.
    pub(crate) fn of(chunk: &ChunkParams, optimizer: &Optimizer) -> StageTensors {
        let mut params = Vec::new();
        chunk.visit(&mut |n, t, r| params.push((n.to_string(), t.dims().to_vec(), role_code(r))));
        let mut buffers = Vec::new();
        visit_chunk_buffers(chunk, &mut |n, t| {
            buffers.push((n.to_string(), t.dims().to_vec()))
        });
        let names: HashSet<&str> = params.iter().map(|p| p.0.as_str()).collect();
        let mut state = Vec::new();
        optimizer.visit_state(&mut |k, t| {
            if names.contains(param_of(k)) {
                state.push((k.to_string(), t.dims().to_vec()));
            }
        });
        StageTensors {
            params,
            buffers,
            state,
        }
    }
}

/// The buffers (expert biases) of a chunk's layers, by global name.
pub(crate) fn visit_chunk_buffers(cp: &ChunkParams, f: &mut dyn FnMut(&str, &Tensor)) {
    for (i, l) in cp.layers.iter().enumerate() {
        l.mlp
            .visit_buffers(&format!("model.layers.{}.mlp", cp.layer_offset + i), f);
    }
}

/// The parameter an optimizer state tensor `<kind>.<parameter>` belongs to (a model
/// tensor's own name otherwise).
pub(crate) fn param_of(name: &str) -> &str {
    STATE_KINDS
        .iter()
        .find_map(|k| name.strip_prefix(k).and_then(|r| r.strip_prefix('.')))
        .unwrap_or(name)
}

/// Every model stage's tensors and the pipeline ranks holding it (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct PipelineTensors {
    stages: Vec<StageTensors>,
    /// The lowest pipeline rank holding each parameter, buffer and state tensor.
    owner: HashMap<String, usize>,
}

impl PipelineTensors {
    /// Collective over the pipeline group `comm`: every rank passes the lists of the model
    /// stages it holds (`mine`, by model stage) and gets every stage's, each from the
    /// lowest rank holding it under `map`.
    pub(crate) fn exchange(
        comm: &dyn Communicator,
        map: &StageMap,
        mine: &BTreeMap<usize, StageTensors>,
    ) -> Result<PipelineTensors> {
        let n = map.model_stages();
        let mut holders: Vec<Vec<usize>> = vec![Vec::new(); n];
        for s in 0..map.stages() {
            if let (Some(r), Some(ms)) = (map.rank(s), map.model_stage(s)) {
                if !holders[ms].contains(&r) {
                    holders[ms].push(r);
                }
            }
        }
        let mut stages = Vec::with_capacity(n);
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (ms, h) in holders.iter().enumerate() {
            let root = h.iter().copied().min().ok_or_else(|| Error::TrainConfig {
                field: "parallel.schedule",
                value: format!("model stage {ms}"),
                rule: "every model stage must be held by a pipeline rank".into(),
            })?;
            let bytes = match mine.get(&ms) {
                Some(st) if comm.rank() == root => {
                    serde_json::to_vec(st).map_err(|e| malformed(ms, e))?
                }
                _ => Vec::new(),
            };
            let bytes = broadcast_bytes(comm, &bytes, root)?;
            let st: StageTensors = serde_json::from_slice(&bytes).map_err(|e| malformed(ms, e))?;
            let names = st.params.iter().map(|p| &p.0);
            for name in names
                .chain(st.buffers.iter().map(|b| &b.0))
                .chain(st.state.iter().map(|s| &s.0))
            {
                let o = owner.entry(name.clone()).or_insert(root);
                *o = (*o).min(root);
            }
            stages.push(st);
        }
        Ok(PipelineTensors { stages, owner })
    }

    /// The lowest pipeline rank holding tensor `name` (parameter, buffer or state).
    pub(crate) fn owner(&self, name: &str) -> Option<usize> {
        self.owner.get(name).copied()
    }

    /// Every distinct parameter in one rank's order (model stages ascending).
    pub(crate) fn params(&self) -> Vec<ParamEntry> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for st in &self.stages {
            for (name, dims, code) in &st.params {
                if seen.insert(name.as_str()) {
                    out.push(ParamEntry {
                        name: name.clone(),
                        dims: dims.clone(),
                        role: ROLES
                            .get(*code as usize)
                            .copied()
                            .unwrap_or(ParamRole::Scalar),
                    });
                }
            }
        }
        out
    }

    /// Every distinct buffer, then every distinct optimizer-state tensor: (name, shape).
    pub(crate) fn buffers_and_state(&self) -> (Vec<NamedShape>, Vec<NamedShape>) {
        let distinct = |pick: fn(&StageTensors) -> &Vec<NamedShape>| {
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for st in &self.stages {
                for (n, d) in pick(st) {
                    if seen.insert(n.clone()) {
                        out.push((n.clone(), d.clone()));
                    }
                }
            }
            out
        };
        (distinct(|s| &s.buffers), distinct(|s| &s.state))
    }
}

fn malformed(ms: usize, e: serde_json::Error) -> Error {
    Error::TrainConfig {
        field: "pipeline stage tensors",
        value: format!("model stage {ms}"),
        rule: format!("the holder's list must (de)serialise: {e}"),
    }
}

/// Broadcasts `bytes` (given on `root` only) to every rank of `comm`, four bytes per i32
/// word (exact: a copy).
pub(crate) fn broadcast_bytes(
    comm: &dyn Communicator,
    bytes: &[u8],
    root: usize,
) -> Result<Vec<u8>> {
    let len = Tensor::from_vec_i32(vec![bytes.len() as i32], [1], Device::Cpu)?;
    let n = comm.broadcast(&len, root)?.to_host_i32()?[0].max(0) as usize;
    let words = n.div_ceil(4);
    let mut packed = vec![0i32; words];
    if comm.rank() == root {
        for (w, c) in packed.iter_mut().zip(bytes.chunks(4)) {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            *w = i32::from_le_bytes(b);
        }
    }
    let t = Tensor::from_vec_i32(packed, [words], Device::Cpu)?;
    let got = if words == 0 {
        Vec::new()
    } else {
        comm.broadcast(&t, root)?.to_host_i32()?
    };
    let mut out: Vec<u8> = got.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.truncate(n);
    Ok(out)
}

/// Sends `bytes` to rank `dst` of `comm` under `tag` (length, then four bytes per i32
/// word); [`recv_bytes`] is the other side.
pub(crate) fn send_bytes(
    comm: &dyn Communicator,
    bytes: &[u8],
    dst: usize,
    tag: u32,
) -> Result<()> {
    let len = Tensor::from_vec_i32(vec![bytes.len() as i32], [1], Device::Cpu)?;
    comm.send(&len, dst, tag)?;
    let words: Vec<i32> = bytes
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            i32::from_le_bytes(b)
        })
        .collect();
    if !words.is_empty() {
        let n = words.len();
        comm.send(&Tensor::from_vec_i32(words, [n], Device::Cpu)?, dst, tag)?;
    }
    Ok(())
}

/// Receives what [`send_bytes`] sent from rank `src` of `comm` under `tag`.
pub(crate) fn recv_bytes(comm: &dyn Communicator, src: usize, tag: u32) -> Result<Vec<u8>> {
    let n = comm.recv(src, tag, &[1], DType::I32)?.to_host_i32()?[0].max(0) as usize;
    let words = n.div_ceil(4);
    if words == 0 {
        return Ok(Vec::new());
    }
    let got = comm.recv(src, tag, &[words], DType::I32)?.to_host_i32()?;
    let mut out: Vec<u8> = got.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.truncate(n);
    Ok(out)
}
