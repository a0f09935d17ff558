//! Checkpoints of a distributed run, sharded: every rank writes the pieces it owns, rank
//! 0 writes the index (format and commit: module `checkpoint::sharded`).
//!
//! A rank's pieces are boxes of the one-rank tensors: an expert rank's experts (rows
//! `ep_rank·E/ep ..` of each bank and of its optimizer state), a tensor-parallel rank's
//! slice along the split dimension, its `parallel.fsdp` rows (the FSDP2 `chunk` rule over
//! the parameter's data-parallel group, within its slice) of the optimizer state and,
//! under `parallel.fsdp = 3`, of the parameters. Replicated tensors are pieces every
//! holder describes; the lowest world rank holding a box writes it.
//!
//! Save ([`Trainer::save_checkpoint`] on rank 0, [`Trainer::join_checkpoint`] on the
//! others, at the same step):
//! ```text
//! rank 0        creates ckpt-<step>.tmp/ and broadcasts its path
//! every rank    sends rank 0 the list of its pieces (names, one-rank shapes, boxes)
//! rank 0        picks each box's writer (lowest rank), checks the boxes tile every
//!               tensor, and tells every rank which of its pieces it writes
//! every rank    writes model-rNNNNN / optim-rNNNNN.safetensors, fsyncs, sends rank 0
//!               their lengths and SHA-256
//! rank 0        writes state.json, then index.json, renames the directory (commit)
//! ```
//! No tensor travels between ranks: rank 0 holds its own pieces and the index.
//!
//! Load ([`Trainer::load_checkpoint`] on every rank, collectively): rank 0 verifies the
//! checkpoint (sharded or one-rank; every file's SHA-256, streamed) and its config and
//! one-rank tensor shapes, and broadcasts its directory and scalar state; then every
//! rank reads the box of each tensor it holds from the pieces overlapping it. Pipeline
//! ranks ([`PipelineRank`](super::PipelineRank)) hold only their stages and read only
//! those. A checkpoint written under any layout therefore loads under any other
//! (resharding is a copy of exact values).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use megamoe_comm::Communicator;
use megamoe_model::tp::tp_split_dim;
use megamoe_optim::ParamRole;
use megamoe_plan::chunk;
use megamoe_tensor::Tensor;

use super::pipeline_tensors::{broadcast_bytes, param_of, recv_bytes, send_bytes};
use crate::checkpoint::{
    assign_owners, check_checkpoint, prepare_tmp_dir, publish_checkpoint, remove_tmp_dir,
    write_index, write_shards, Checkpoint, Expected, FileDigest, HeldPiece, NamedTensor,
    ShardReader, Slab, TensorSet, TensorSpec, TrainState,
};
use crate::error::{Error, Result};
use crate::trainer::Trainer;

/// Tag of the messages of a sharded save.
const SAVE_TAG: u32 = 10;

/// The pieces one rank holds and, when saving, their values (same order).
#[derive(Debug, Default)]
pub(crate) struct HeldTensors {
    pub(crate) pieces: Vec<HeldPiece>,
    pub(crate) values: Vec<NamedTensor>,
}

impl HeldTensors {
    /// Adds piece `slab` of tensor `name` (one-rank shape `global`) held as `t`, which
    /// must have the piece's shape; copies `t` to the host when `values` is set.
    pub(crate) fn push(
        &mut self,
        set: TensorSet,
        name: &str,
        global: Vec<usize>,
        slab: Slab,
        t: &Tensor,
        values: bool,
    ) -> Result<()> {
        if t.dims() != slab.shape.as_slice() {
            return Err(shard_error(
                name,
                &format!(
                    "this rank holds {:?}, but its piece {:?} of {global:?} is {:?}",
                    t.dims(),
                    slab.offset,
                    slab.shape
                ),
            ));
        }
        // Optimizer state keeps bf16 (bf16 AdamW moments); the model is saved as f32.
        use megamoe_tensor::DType;
        let dtype = match (set, t.dtype()) {
            (TensorSet::Optimizer, DType::BF16) => DType::BF16,
            _ => DType::F32,
        };
        if values {
            self.values
                .push(NamedTensor::from_tensor(name, t)?.with_dtype(dtype));
        }
        self.pieces.push(HeldPiece {
            set,
            name: name.to_string(),
            global,
            slab,
            dtype: crate::checkpoint::stored_dtype(dtype),
        });
        Ok(())
    }

    /// One-rank specs of the model and optimizer tensors held.
    pub(crate) fn specs(&self) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let of = |set| {
            self.pieces
                .iter()
                .filter(|p| p.set == set)
                .map(|p| TensorSpec {
                    name: p.name.clone(),
                    shape: p.global.clone(),
                })
                .collect()
        };
        (of(TensorSet::Model), of(TensorSet::Optimizer))
    }

    /// Every held piece read from `reader`, model then optimizer, in this rank's shapes.
    pub(crate) fn read(
        &self,
        reader: &ShardReader,
    ) -> Result<(Vec<NamedTensor>, Vec<NamedTensor>)> {
        let read = |set| -> Result<Vec<NamedTensor>> {
            self.pieces
                .iter()
                .filter(|p| p.set == set)
                .map(|p| {
                    let data = reader.read(set, &p.name, &p.slab)?;
                    let t = NamedTensor::new(p.name.clone(), p.slab.shape.clone(), data);
                    Ok(t.with_dtype(reader.dtype(set, &p.name)?))
                })
                .collect()
        };
        Ok((read(TensorSet::Model)?, read(TensorSet::Optimizer)?))
    }
}

pub(crate) fn shard_error(name: &str, rule: &str) -> Error {
    Error::TrainConfig {
        field: "checkpoint shard",
        value: name.to_string(),
        rule: rule.to_string(),
    }
}

impl Trainer {
    /// The pieces this (non-pipeline) rank holds: parameters, buffers and optimizer
    /// state, with their values when `values` is set (see the module doc).
    fn held_pieces(&self, values: bool) -> Result<HeldTensors> {
        let Some(par) = self.parallel.as_ref() else {
            return Err(shard_error(
                "<rank>",
                "only ranks of a distributed run hold pieces",
            ));
        };
        let rows_only = par.holds_rows_only();
        let (ep, ep_rank) = (par.mesh.ep, par.coords.ep);
        let (tp, tp_rank) = (par.mesh.tp, par.coords.tp);
        // Per parameter: one-rank shape, the box of the parameter, of its state.
        let mut boxes: HashMap<String, (Vec<usize>, Slab, Slab)> = HashMap::new();
        let mut index = 0;
        self.params.visit(&mut |name, t, role| {
            let expert = role == ParamRole::ExpertBank;
            // This rank's slice / experts, all rows.
            let mut local = t.dims().to_vec();
            if rows_only {
                if let Some(r) = local.first_mut() {
                    *r = par.full_rows(index).unwrap_or(*r);
                }
            }
            index += 1;
            let mut global = local.clone();
            if expert {
                if let Some(r) = global.first_mut() {
                    *r *= ep;
                }
            }
            par.tp_full_dims(name, &mut global);
            let mut slab = Slab::whole(&global);
            if expert && ep > 1 && !local.is_empty() {
                slab = slab.narrow(0, ep_rank * local[0], local[0]);
            }
            if let Some(d) = tp_split_dim(name).filter(|&d| tp > 1 && d < local.len()) {
                slab = slab.narrow(d, tp_rank * local[d], local[d]);
            }
            let rows = |s: &Slab| match s.shape.first() {
                Some(&n) => {
                    let g: &dyn Communicator = if expert {
                        par.expert_dp.as_ref()
                    } else {
                        par.dense_dp.as_ref()
                    };
                    let c = chunk(n, g.size(), g.rank());
                    s.narrow(0, c.start, c.len)
                }
                None => s.clone(),
            };
            let state = if par.is_sharded() {
                rows(&slab)
            } else {
                slab.clone()
            };
            let param = if rows_only { rows(&slab) } else { slab };
            boxes.insert(name.to_string(), (global, param, state));
        });
        let mut held = HeldTensors::default();
        let mut err = None;
        let mut keep = |r: Result<()>| {
            if let (Err(e), None) = (r, &err) {
                err = Some(e);
            }
        };
        self.params.visit(&mut |name, t, _| {
            let (global, slab, _) = boxes[name].clone();
            keep(held.push(TensorSet::Model, name, global, slab, t, values));
        });
        self.params.visit_buffers(&mut |name, t| {
            let whole = Slab::whole(t.dims());
            keep(held.push(TensorSet::Model, name, t.dims().to_vec(), whole, t, values));
        });
        self.optimizer.visit_state(&mut |key, t| {
            let (global, slab) = match boxes.get(param_of(key)) {
                Some((g, _, s)) => (g.clone(), s.clone()),
                None => (t.dims().to_vec(), Slab::whole(t.dims())),
            };
            keep(held.push(TensorSet::Optimizer, key, global, slab, t, values));
        });
        err.map_or(Ok(held), Err)
    }

    /// This rank's part of a sharded checkpoint save; `writer` (rank 0 only) is the
    /// checkpoints directory and the scalar state. Collective over the world. Returns
    /// the checkpoint directory on rank 0.
    pub(crate) fn save_shards(
        &mut self,
        writer: Option<(&Path, &TrainState)>,
    ) -> Result<Option<PathBuf>> {
        let held = match (self.pipeline.as_ref(), self.parallel.as_ref()) {
            (Some(rank), Some(par)) => {
                rank.held_pieces(&par.pipeline_groups(), (par.coords.ep, par.mesh.ep))?
            }
            _ => self.held_pieces(true)?,
        };
        crate::trainer::check_finite(self.step, &held.values)?;
        let Some(par) = self.parallel.as_ref() else {
            return Err(shard_error(
                "<rank>",
                "only ranks of a distributed run save shards",
            ));
        };
        save_sharded(par.world(), writer, self.step, held)
    }

    /// A non-writing rank's part of a checkpoint save: writes the pieces it owns into
    /// the directory rank 0's [`Trainer::save_checkpoint`] opens (collective; the
    /// directory must be visible to every rank: one host, or a shared file system).
    pub fn join_checkpoint(&mut self) -> Result<()> {
        if self.parallel.is_some() {
            self.save_shards(None)?;
        }
        Ok(())
    }

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
        let held = self.held_pieces(false)?;
        let (model_specs, optim_specs) = held.specs();
        let (dir, state) = open_on_rank_zero(
            par.world(),
            path,
            &self.config_toml,
            &model_specs,
            &optim_specs,
        )?;
        let reader = ShardReader::open(&dir)?;
        let (model, optimizer) = held.read(&reader)?;
        let ckpt = Checkpoint {
            dir,
            state,
            model,
            optimizer,
        };
        self.apply_checkpoint(&ckpt, started)?;

        // Derived shards: FSDP rows of the parameters.
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

fn encode<T: serde::Serialize>(what: &'static str, x: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(x).map_err(|source| Error::Serialize { what, source })
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| shard_error(what, &format!("must parse: {e}")))
}

/// The sharded save protocol (see the module doc) for the pieces `held` of this rank
/// at step `step`; `writer` is rank 0's checkpoints directory and scalar state.
/// Collective over `world`. On rank 0 a failure removes the `.tmp` directory.
pub(crate) fn save_sharded(
    world: &dyn Communicator,
    writer: Option<(&Path, &TrainState)>,
    step: u64,
    held: HeldTensors,
) -> Result<Option<PathBuf>> {
    let rank = world.rank();
    let writer = match (rank, writer) {
        (0, None) => {
            return Err(shard_error(
                "rank 0",
                "writes the index: it must call save_checkpoint, not join_checkpoint",
            ))
        }
        (0, w) => w,
        _ => None,
    };
    let tmp = match writer {
        Some((dir, _)) => Some(prepare_tmp_dir(dir, step)?),
        None => None,
    };
    let result = save_steps(world, writer, tmp.as_deref(), step, &held);
    if let (Err(_), Some(tmp)) = (&result, &tmp) {
        if tmp.exists() {
            remove_tmp_dir(tmp);
        }
    }
    result
}

fn save_steps(
    world: &dyn Communicator,
    writer: Option<(&Path, &TrainState)>,
    tmp: Option<&Path>,
    step: u64,
    held: &HeldTensors,
) -> Result<Option<PathBuf>> {
    let (rank, size) = (world.rank(), world.size());
    // 1. Where to write.
    let path = tmp
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let got = broadcast_bytes(world, path.as_bytes(), 0)?;
    let tmp_dir = PathBuf::from(String::from_utf8_lossy(&got).into_owned());
    // 2. Who writes what.
    let mut entries = None;
    let owned: Vec<bool> = if rank == 0 {
        let mut all = vec![held.pieces.clone()];
        for r in 1..size {
            all.push(decode("piece list", &recv_bytes(world, r, SAVE_TAG)?)?);
        }
        let (owners, model, optimizer) = assign_owners(&all)?;
        for (r, o) in owners.iter().enumerate().skip(1) {
            send_bytes(world, &encode("owner list", o)?, r, SAVE_TAG)?;
        }
        entries = Some((model, optimizer));
        owners.into_iter().next().unwrap_or_default()
    } else {
        send_bytes(world, &encode("piece list", &held.pieces)?, 0, SAVE_TAG)?;
        decode("owner list", &recv_bytes(world, 0, SAVE_TAG)?)?
    };
    if owned.len() != held.pieces.len() {
        return Err(shard_error(
            "owner list",
            "must name every piece of this rank",
        ));
    }
    // 3. The shard files, durable before rank 0 hears of them.
    let digests = write_shards(&tmp_dir, rank, step, &held.pieces, &held.values, &owned)?;
    let (Some((checkpoints_dir, state)), Some((model, optimizer))) = (writer, entries) else {
        send_bytes(world, &encode("file digests", &digests)?, 0, SAVE_TAG)?;
        world.barrier()?;
        return Ok(None);
    };
    // 4. The index, then the commit.
    let mut files: BTreeMap<String, FileDigest> = digests;
    for r in 1..size {
        let theirs: BTreeMap<String, FileDigest> =
            decode("file digests", &recv_bytes(world, r, SAVE_TAG)?)?;
        files.extend(theirs);
    }
    write_index(&tmp_dir, state, size, files, model, optimizer)?;
    let dir = publish_checkpoint(checkpoints_dir, &tmp_dir, step)?;
    world.barrier()?;
    Ok(Some(dir))
}

/// Rank 0 resolves `path`, verifies the checkpoint and checks it against `config_toml`
/// and the one-rank tensor specs; its directory and scalar state reach every rank of
/// `world`. Collective; an error on rank 0 stops every rank.
pub(super) fn open_on_rank_zero(
    world: &dyn Communicator,
    path: &Path,
    config_toml: &str,
    model: &[TensorSpec],
    optimizer: &[TensorSpec],
) -> Result<(PathBuf, TrainState)> {
    let opened = if world.rank() == 0 {
        let expected = Expected {
            config_toml: Some(config_toml),
            model: Some(model),
            optimizer: Some(optimizer),
        };
        Some(check_checkpoint(path, &expected)?)
    } else {
        None
    };
    let json = match &opened {
        Some(o) => encode("checkpoint state", o)?,
        None => Vec::new(),
    };
    let got = broadcast_bytes(world, &json, 0)?;
    decode("rank 0's checkpoint state", &got)
}
