//! Checkpoints: crash-safe save and validating load.
//!
//! A run directory keeps its checkpoints under `checkpoints/`:
//!
//! ```text
//! <run_dir>/checkpoints/
//!   latest                      text file: "ckpt-00000020\n" (informational only)
//!   ckpt-00000010/
//!     model.safetensors         weights, PyTorch-style names, f32, metadata {"format": "pt"}
//!     optimizer.safetensors     optimizer tensors ("<param>.exp_avg", ...), f32; AdamW
//!                               moments bf16 under optim.moment_dtype = "bf16"
//!     state.json                step, RNG words, data position, config TOML text,
//!                               goodput totals, extras, format version
//!     manifest.json             format version, step, and byte length + SHA-256 of
//!                               the three files above; written last
//!   ckpt-00000020/ ...
//! ```
//!
//! **Commit protocol.** Every file is written under a temporary name, fsynced and
//! renamed; the checkpoint is assembled in `ckpt-<step>.tmp/` with `manifest.json`
//! last, fsynced, and renamed to `ckpt-<step>/`. That rename is the commit: a
//! `ckpt-<step>/` directory is complete by construction, and its manifest proves it
//! (a file edited, truncated or lost later fails verification). `latest` is written
//! afterwards for people and tools, but nothing trusts it: resuming a run directory
//! scans `ckpt-*/` and takes the newest checkpoint whose manifest verifies
//! ([`scan_checkpoints`]), reporting every directory it passed over (`.tmp` debris of
//! a save that died, a checkpoint that fails verification). A save that fails
//! (ENOSPC, ...) removes its `.tmp` directory. Saving a step that already has a
//! checkpoint (a resumed run re-reaching it) replaces the old one: it is moved to
//! `ckpt-<step>.replaced/`, the new one renamed into place, the old one deleted.
//!
//! **Validation.** [`load_checkpoint`] checks the format version, each file's length
//! (truncation) and SHA-256 (corruption) against the manifest, the config text (first
//! differing line) and, when given, every tensor's name and shape, returning a typed
//! [`Error`] naming the file and the mismatch. Loading never writes.
//!
//! **Crash tests.** The save passes the failpoints of [`crate::failpoint`] between
//! its file operations, so tests can kill it at each one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use megamoe_tensor::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::goodput::GoodputTotals;
use crate::sha256::sha256_hex;

mod config_diff;
mod legacy;
mod scan;
mod sharded;
mod stored;
pub use config_diff::{resume_config_changes, ConfigChange, RESUME_LAYOUT_KEYS, RESUME_SAFE_KEYS};
pub use scan::{
    list_checkpoints, prune_checkpoints, resolve_checkpoint, retire_checkpoints_after, run_dir_of,
    scan_checkpoints, CheckpointScan, Resolved, Skipped,
};
pub(crate) use sharded::{assign_owners, write_index, write_shards};
pub use sharded::{
    shard_file_name, HeldPiece, IndexEntry, Piece, ShardIndex, ShardReader, Slab, TensorSet,
    INDEX_FILE, INDEX_FORMAT_VERSION,
};
pub use stored::stored_dtype;

/// Version of the checkpoint layout written by this build.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 2;
/// Subdirectory of a run directory holding checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Pointer file naming the newest checkpoint saved (informational: resume scans).
pub const LATEST_FILE: &str = "latest";
/// Model weights file.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Scalar state file.
pub const STATE_FILE: &str = "state.json";
/// Manifest of a complete checkpoint (lengths and digests of the other files).
pub const MANIFEST_FILE: &str = "manifest.json";

/// One named tensor, row-major: the unit of checkpoint I/O. Its values are held as f32;
/// `dtype` is how the file stores them (f32, or bf16 for values that are bf16: AdamW's bf16
/// moments).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// PyTorch-style dotted name, e.g. `layers.3.moe.experts.w_up`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
    /// Stored element type: [`DType::F32`], or [`DType::BF16`] (every value a bf16).
    pub dtype: DType,
}

impl NamedTensor {
    /// An f32 tensor from parts (checked when saved).
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        NamedTensor {
            name: name.into(),
            shape,
            data,
            dtype: DType::F32,
        }
    }

    /// [`NamedTensor::new`] stored as `dtype` (f32 or bf16; bf16 values must be bf16).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// [`NamedTensor::from_tensor`] keeping a bf16 tensor bf16 in the file (optimizer
    /// state: bf16 AdamW moments are saved and resumed as bf16, bit for bit).
    pub fn from_tensor_keep_bf16(name: impl Into<String>, tensor: &Tensor) -> Result<Self> {
        let dtype = match tensor.dtype() {
            DType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        Ok(NamedTensor::from_tensor(name, tensor)?.with_dtype(dtype))
    }

    /// Copies a tensor to the host as f32 (BF16 widens exactly; I32 converts to the
    /// nearest f32, exact below 2^24). SYNC: reads the tensor to the host.
    pub fn from_tensor(name: impl Into<String>, tensor: &Tensor) -> Result<Self> {
        // SYNC: checkpoint writes need the values on the host.
        let data = tensor.to_host_f32()?;
        Ok(NamedTensor::new(name, tensor.dims().to_vec(), data))
    }

    /// A tensor on `device` with this data, of the stored dtype (f32, or bf16 where the
    /// file stores bf16; convert with `to_dtype` for BF16 parameters, whose values saved
    /// as f32 round-trip exactly).
    pub fn to_tensor(&self, device: Device) -> Result<Tensor> {
        let t = Tensor::from_vec_f32(self.data.clone(), self.shape.clone(), device)?;
        Ok(match self.dtype {
            DType::BF16 => t.to_dtype(DType::BF16)?,
            _ => t,
        })
    }

    /// Its name and shape.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            shape: self.shape.clone(),
        }
    }
}

/// A tensor's name and shape, what a load is validated against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Expected shape.
    pub shape: Vec<usize>,
}

/// Everything besides tensors that a bit-identical resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed (the checkpoint is named after it).
    pub step: u64,
    /// The trainer's RNG state as opaque words (dropout, sampling, ...).
    pub rng: Vec<u64>,
    /// Updates the optimizer has applied (its bias-correction step count; lower than
    /// `step` when the NaN guard skipped updates).
    #[serde(default)]
    pub optimizer_steps: u64,
    /// Where the training batcher stands.
    pub data: DataPosition,
    /// The full resolved config as TOML text.
    pub config_toml: String,
    /// Time accounting so far.
    pub goodput: GoodputTotals,
    /// Other scalars (optimizer step counts, loss scale, NaN streak, ...), by name.
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Length and digest of a file, recorded in `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Length in bytes.
    pub bytes: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

impl FileDigest {
    fn of(bytes: &[u8]) -> Self {
        FileDigest {
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }
}

/// The on-disk form of `state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    #[serde(flatten)]
    state: TrainState,
}

/// The on-disk form of `manifest.json`: what makes a checkpoint complete.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    step: u64,
    files: BTreeMap<String, FileDigest>,
}

/// Files every checkpoint holds besides its manifest.
const CHECKPOINT_FILES: [&str; 3] = [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE];

/// A loaded, validated checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The checkpoint directory it was read from.
    pub dir: PathBuf,
    /// Scalar state.
    pub state: TrainState,
    /// Model tensors, in the order of [`Expected::model`] when given, else by name.
    pub model: Vec<NamedTensor>,
    /// Optimizer tensors, in the order of [`Expected::optimizer`] when given, else by name.
    pub optimizer: Vec<NamedTensor>,
}

/// What a loaded checkpoint must match; `None` skips that check.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected<'a> {
    /// The current config TOML; compared key by key, where only
    /// [`RESUME_SAFE_KEYS`] may differ.
    pub config_toml: Option<&'a str>,
    /// Exactly these model tensors (no missing, no extra, same shapes).
    pub model: Option<&'a [TensorSpec]>,
    /// Exactly these optimizer tensors.
    pub optimizer: Option<&'a [TensorSpec]>,
}

/// Directory name of the checkpoint of `step`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("ckpt-{step:08}")
}

/// Saves a checkpoint of `state.step` under `checkpoints_dir` (created if needed),
/// replacing an older checkpoint of the same step, and points `latest` at it.
/// Returns the checkpoint directory.
///
/// Fails with [`Error::CheckpointTensorInvalid`] for an empty or duplicate name or a
/// data length that disagrees with the shape; in every failure case the other
/// checkpoints are untouched and no `.tmp` directory is left behind.
pub fn save_checkpoint(
    checkpoints_dir: &Path,
    state: &TrainState,
    model: &[NamedTensor],
    optimizer: &[NamedTensor],
) -> Result<PathBuf> {
    validate_tensors(model)?;
    validate_tensors(optimizer)?;
    let step = state.step;
    let tmp_dir = prepare_tmp_dir(checkpoints_dir, step)?;
    if let Err(e) = write_checkpoint_files(&tmp_dir, state, model, optimizer) {
        remove_tmp_dir(&tmp_dir);
        return Err(e);
    }
    publish_checkpoint(checkpoints_dir, &tmp_dir, step)
}

/// Creates the empty `ckpt-<step>.tmp/` of a save under `checkpoints_dir` (created if
/// needed), clearing the debris of an earlier save of that step that crashed.
pub(crate) fn prepare_tmp_dir(checkpoints_dir: &Path, step: u64) -> Result<PathBuf> {
    let name = checkpoint_dir_name(step);
    let tmp_dir = checkpoints_dir.join(format!("{name}.tmp"));
    if tmp_dir.exists() {
        // Debris of a save that crashed; never loaded, safe to clear.
        log::warn!("removing incomplete checkpoint {}", tmp_dir.display());
        std::fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io("remove", &tmp_dir, e))?;
    }
    std::fs::create_dir_all(&tmp_dir).map_err(|e| Error::io("create", &tmp_dir, e))?;
    failpoint::hit("checkpoint.tmp_created", step);
    Ok(tmp_dir)
}

/// Removes the `.tmp` directory of a save that failed (ENOSPC and friends: leave no
/// half-written directory behind).
pub(crate) fn remove_tmp_dir(tmp_dir: &Path) {
    if let Err(rm) = std::fs::remove_dir_all(tmp_dir) {
        log::warn!("cannot remove {}: {rm}", tmp_dir.display());
    }
}

/// Commits the complete `tmp_dir` of step `step` as `ckpt-<step>/` (the rename is the
/// commit), replacing an older checkpoint of that step, and points `latest` at it.
pub(crate) fn publish_checkpoint(
    checkpoints_dir: &Path,
    tmp_dir: &Path,
    step: u64,
) -> Result<PathBuf> {
    let name = checkpoint_dir_name(step);
    let final_dir = checkpoints_dir.join(&name);
    let replaced = checkpoints_dir.join(format!("{name}.replaced"));
    let replacing = final_dir.exists();
    if replacing {
        // A resumed run re-reached this step: the new checkpoint supersedes the old.
        if replaced.exists() {
            std::fs::remove_dir_all(&replaced).map_err(|e| Error::io("remove", &replaced, e))?;
        }
        std::fs::rename(&final_dir, &replaced).map_err(|e| Error::io("rename", &final_dir, e))?;
        failpoint::hit("checkpoint.old_moved", step);
    }
    std::fs::rename(tmp_dir, &final_dir).map_err(|e| Error::io("rename", tmp_dir, e))?;
    sync_dir(checkpoints_dir)?;
    failpoint::hit("checkpoint.renamed", step);
    if replacing {
        log::info!("replaced the older checkpoint {}", final_dir.display());
        std::fs::remove_dir_all(&replaced).map_err(|e| Error::io("remove", &replaced, e))?;
    }
    write_file_atomic(
        &checkpoints_dir.join(LATEST_FILE),
        format!("{name}\n").as_bytes(),
        step,
    )?;
    sync_dir(checkpoints_dir)?;
    failpoint::hit("checkpoint.latest_written", step);
    log::info!("saved checkpoint {}", final_dir.display());
    Ok(final_dir)
}

/// Writes the three checkpoint files and then the manifest into `dir`.
fn write_checkpoint_files(
    dir: &Path,
    state: &TrainState,
    model: &[NamedTensor],
    optimizer: &[NamedTensor],
) -> Result<()> {
    let step = state.step;
    let mut files = BTreeMap::new();
    for (file, tensors, point) in [
        (MODEL_FILE, model, "checkpoint.model_written"),
        (OPTIMIZER_FILE, optimizer, "checkpoint.optimizer_written"),
    ] {
        let bytes = encode_safetensors(tensors)?;
        write_file_atomic(&dir.join(file), &bytes, step)?;
        files.insert(file.to_string(), FileDigest::of(&bytes));
        failpoint::hit(point, step);
    }
    write_state_file(dir, state, &mut files)?;
    let manifest = Manifest {
        format_version: CHECKPOINT_FORMAT_VERSION,
        step,
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| Error::Serialize {
        what: "checkpoint manifest.json",
        source,
    })?;
    write_file_atomic(&dir.join(MANIFEST_FILE), &json, step)?;
    sync_dir(dir)?;
    failpoint::hit("checkpoint.manifest_written", step);
    Ok(())
}

/// Reads `manifest.json` of checkpoint directory `dir` and checks the format version
/// and every file's length and SHA-256. Returns the verified files' bytes.
pub(crate) fn verify_checkpoint(dir: &Path) -> Result<BTreeMap<&'static str, Vec<u8>>> {
    let (manifest_path, manifest) = read_manifest(dir)?;
    let mut out = BTreeMap::new();
    for file in CHECKPOINT_FILES {
        let path = dir.join(file);
        let digest = manifest
            .files
            .get(file)
            .ok_or_else(|| Error::CheckpointMalformed {
                path: manifest_path.clone(),
                reason: format!("no length/sha256 recorded for {file}"),
            })?;
        let bytes = read_required(dir, file)?;
        if bytes.len() as u64 != digest.bytes {
            return Err(Error::CheckpointTruncated {
                path,
                expected: digest.bytes,
                actual: bytes.len() as u64,
            });
        }
        let sha = sha256_hex(&bytes);
        if sha != digest.sha256 {
            return Err(Error::CheckpointCorrupt {
                path,
                expected: digest.sha256.clone(),
                actual: sha,
            });
        }
        out.insert(file, bytes);
    }
    Ok(out)
}

/// Loads and validates the checkpoint `path` refers to (see [`resolve_checkpoint`]).
pub fn load_checkpoint(path: &Path, expected: &Expected<'_>) -> Result<Checkpoint> {
    let dir = resolve_checkpoint(path)?.dir;
    if dir.join(INDEX_FILE).is_file() && !dir.join(MANIFEST_FILE).is_file() {
        return load_sharded_whole(dir, expected);
    }
    let mut files = verify_checkpoint(&dir)?;
    let state_path = dir.join(STATE_FILE);
    let state_bytes = files.remove(STATE_FILE).unwrap_or_default();
    let state_file: StateFile =
        serde_json::from_slice(&state_bytes).map_err(|e| Error::CheckpointMalformed {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
    if state_file.format_version != CHECKPOINT_FORMAT_VERSION {
        return Err(Error::CheckpointVersion {
            path: state_path,
            found: state_file.format_version,
            supported: CHECKPOINT_FORMAT_VERSION,
        });
    }
    if let Some(current) = expected.config_toml {
        compare_config(&state_path, &state_file.state.config_toml, current)?;
    }
    let model = decode_tensor_file(
        &dir.join(MODEL_FILE),
        &files.remove(MODEL_FILE).unwrap_or_default(),
        expected.model,
    )?;
    let optimizer = decode_tensor_file(
        &dir.join(OPTIMIZER_FILE),
        &files.remove(OPTIMIZER_FILE).unwrap_or_default(),
        expected.optimizer,
    )?;
    Ok(Checkpoint {
        dir,
        state: state_file.state,
        model,
        optimizer,
    })
}

/// Reads the [`TrainState`] of checkpoint directory `dir` after verifying its
/// manifest or index (no tensors are decoded).
pub fn read_checkpoint_state(dir: &Path) -> Result<TrainState> {
    verify_any(dir)?;
    read_state_file(dir)
}

/// Whether `dir` is a committed checkpoint (one-rank `manifest.json` or sharded
/// `index.json`; not verified).
pub fn is_checkpoint_complete(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file() || dir.join(INDEX_FILE).is_file()
}

/// Verifies checkpoint directory `dir` in either layout: every file's length and
/// SHA-256 against its manifest (one-rank) or index (sharded), streamed.
pub(crate) fn verify_any(dir: &Path) -> Result<()> {
    if dir.join(INDEX_FILE).is_file() && !dir.join(MANIFEST_FILE).is_file() {
        return sharded::verify_sharded(dir).map(drop);
    }
    let (manifest_path, manifest) = read_manifest(dir)?;
    if let Some(file) = CHECKPOINT_FILES
        .iter()
        .find(|f| !manifest.files.contains_key(**f))
    {
        return Err(Error::CheckpointMalformed {
            path: manifest_path,
            reason: format!("no length/sha256 recorded for {file}"),
        });
    }
    for file in CHECKPOINT_FILES {
        if !dir.join(file).is_file() {
            return Err(Error::CheckpointFileMissing {
                dir: dir.to_path_buf(),
                file,
            });
        }
    }
    sharded::verify_files(dir, &manifest.files)
}

/// `state.json` of `dir` (not verified), its format version checked.
fn read_state_file(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let bytes = read_required(dir, STATE_FILE)?;
    let state_file: StateFile =
        serde_json::from_slice(&bytes).map_err(|e| Error::CheckpointMalformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if state_file.format_version != CHECKPOINT_FORMAT_VERSION {
        return Err(Error::CheckpointVersion {
            path,
            found: state_file.format_version,
            supported: CHECKPOINT_FORMAT_VERSION,
        });
    }
    Ok(state_file.state)
}

/// Resolves `path` to a checkpoint directory of either layout, verifies it (streamed),
/// and checks its config and its tensors' one-rank names and shapes against `expected`
/// without reading any tensor. Returns the directory and its scalar state: what one rank
/// of a distributed load does before every rank reads its pieces ([`ShardReader`]).
pub fn check_checkpoint(path: &Path, expected: &Expected<'_>) -> Result<(PathBuf, TrainState)> {
    let dir = resolve_checkpoint(path)?.dir;
    verify_any(&dir)?;
    let state = read_state_file(&dir)?;
    if let Some(current) = expected.config_toml {
        compare_config(&dir.join(STATE_FILE), &state.config_toml, current)?;
    }
    let reader = ShardReader::open(&dir)?;
    let sharded = dir.join(INDEX_FILE).is_file() && !dir.join(MANIFEST_FILE).is_file();
    let (model_path, optim_path) = if sharded {
        (dir.join(INDEX_FILE), dir.join(INDEX_FILE))
    } else {
        (dir.join(MODEL_FILE), dir.join(OPTIMIZER_FILE))
    };
    if let Some(m) = expected.model {
        sharded::check_specs(&model_path, &reader.index().model, m)?;
    }
    if let Some(o) = expected.optimizer {
        sharded::check_specs(&optim_path, &reader.index().optimizer, o)?;
    }
    Ok((dir, state))
}

/// [`load_checkpoint`] of a sharded checkpoint: every tensor assembled whole from its
/// pieces (what one rank, or a tool, needs).
fn load_sharded_whole(dir: PathBuf, expected: &Expected<'_>) -> Result<Checkpoint> {
    let (dir, state) = check_checkpoint(&dir, expected)?;
    let reader = ShardReader::open(&dir)?;
    let read = |set: TensorSet, specs: Option<&[TensorSpec]>| -> Result<Vec<NamedTensor>> {
        let names: Vec<String> = match specs {
            Some(specs) => specs.iter().map(|s| s.name.clone()).collect(),
            None => match set {
                TensorSet::Model => reader.index().model.keys().cloned().collect(),
                TensorSet::Optimizer => reader.index().optimizer.keys().cloned().collect(),
            },
        };
        names.iter().map(|n| reader.read_whole(set, n)).collect()
    };
    let model = read(TensorSet::Model, expected.model)?;
    let optimizer = read(TensorSet::Optimizer, expected.optimizer)?;
    Ok(Checkpoint {
        dir,
        state,
        model,
        optimizer,
    })
}

fn validate_tensors(tensors: &[NamedTensor]) -> Result<()> {
    let mut seen = HashSet::new();
    for t in tensors {
        let invalid = |rule: String| Error::CheckpointTensorInvalid {
            tensor: t.name.clone(),
            rule,
        };
        if t.name.is_empty() || t.name == "__metadata__" {
            return Err(invalid(
                "a tensor name must be non-empty and not `__metadata__`".into(),
            ));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(invalid("the name appears twice".into()));
        }
        let numel: usize = t.shape.iter().product();
        if numel != t.data.len() {
            return Err(invalid(format!(
                "shape {:?} holds {numel} values but data has {}",
                t.shape,
                t.data.len()
            )));
        }
        // A bf16 value widened to f32 has zero low 16 bits.
        let exact = |x: &f32| x.to_bits() & 0xffff == 0;
        match t.dtype {
            DType::F32 => {}
            DType::BF16 if t.data.iter().all(exact) => {}
            DType::BF16 => return Err(invalid("bf16 storage needs bf16 values".into())),
            DType::I32 => return Err(invalid("stored as f32 or bf16".into())),
        }
    }
    Ok(())
}

fn encode_safetensors(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| match t.dtype {
            DType::BF16 => t
                .data
                .iter()
                .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
            _ => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let dtype = match t.dtype {
            DType::BF16 => Dtype::BF16,
            _ => Dtype::F32,
        };
        let view = TensorView::new(dtype, t.shape.clone(), b).map_err(|e| {
            Error::CheckpointTensorInvalid {
                tensor: t.name.clone(),
                rule: e.to_string(),
            }
        })?;
        views.push((t.name.clone(), view));
    }
    // `format: pt` tells Hugging Face loaders the names follow PyTorch conventions.
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::tensor::serialize(views, &metadata).map_err(|e| Error::CheckpointTensorInvalid {
        tensor: "<file>".to_string(),
        rule: e.to_string(),
    })
}

/// Writes `state.json` (format version + `state`) into checkpoint directory `dir`
/// atomically and records its digest in `files` (one-rank and sharded writers alike).
pub(crate) fn write_state_file(
    dir: &Path,
    state: &TrainState,
    files: &mut BTreeMap<String, FileDigest>,
) -> Result<()> {
    let step = state.step;
    let state_file = StateFile {
        format_version: CHECKPOINT_FORMAT_VERSION,
        state: state.clone(),
    };
    let json = serde_json::to_vec_pretty(&state_file).map_err(|source| Error::Serialize {
        what: "checkpoint state.json",
        source,
    })?;
    write_file_atomic(&dir.join(STATE_FILE), &json, step)?;
    files.insert(STATE_FILE.to_string(), FileDigest::of(&json));
    failpoint::hit("checkpoint.state_written", step);
    Ok(())
}

/// Reads and parses `manifest.json` of checkpoint directory `dir` and checks its format
/// version: `(path of the manifest, manifest)`.
fn read_manifest(dir: &Path) -> Result<(PathBuf, Manifest)> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = read_required(dir, MANIFEST_FILE)?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::CheckpointMalformed {
            path: manifest_path.clone(),
            reason: e.to_string(),
        })?;
    if manifest.format_version != CHECKPOINT_FORMAT_VERSION {
        return Err(Error::CheckpointVersion {
            path: manifest_path,
            found: manifest.format_version,
            supported: CHECKPOINT_FORMAT_VERSION,
        });
    }
    Ok((manifest_path, manifest))
}

fn read_required(dir: &Path, file: &'static str) -> Result<Vec<u8>> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::CheckpointFileMissing {
                dir: dir.to_path_buf(),
                file,
            }
        } else {
            Error::io("read", &path, e)
        }
    })
}

fn decode_tensor_file(
    path: &Path,
    bytes: &[u8],
    expected: Option<&[TensorSpec]>,
) -> Result<Vec<NamedTensor>> {
    let path = path.to_path_buf();
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::CheckpointMalformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut by_name: BTreeMap<String, NamedTensor> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let (data, dtype) = match view.dtype() {
            Dtype::F32 => (stored::decode_values(view.data(), 4), DType::F32),
            Dtype::BF16 => (stored::decode_values(view.data(), 2), DType::BF16),
            other => {
                return Err(Error::CheckpointMalformed {
                    path,
                    reason: format!(
                        "tensor {name} has dtype {other:?}; only F32 and BF16 are supported"
                    ),
                });
            }
        };
        let shape = view.shape().to_vec();
        let t = NamedTensor::new(name.clone(), shape, data).with_dtype(dtype);
        by_name.insert(name, t);
    }
    let Some(expected) = expected else {
        return Ok(by_name.into_values().collect());
    };
    legacy::fuse_split_gate_up(&mut by_name, expected);
    let mut out = Vec::with_capacity(expected.len());
    for spec in expected {
        let t = by_name
            .remove(&spec.name)
            .ok_or_else(|| Error::CheckpointTensorMissing {
                path: path.clone(),
                tensor: spec.name.clone(),
            })?;
        if t.shape != spec.shape {
            return Err(Error::CheckpointShapeMismatch {
                path,
                tensor: spec.name.clone(),
                expected: spec.shape.clone(),
                found: t.shape,
            });
        }
        out.push(t);
    }
    if let Some(extra) = by_name.into_keys().next() {
        return Err(Error::CheckpointTensorUnexpected {
            path,
            tensor: extra,
        });
    }
    Ok(out)
}

/// The saved and current configs may differ only in [`RESUME_SAFE_KEYS`].
fn compare_config(state_path: &Path, saved: &str, current: &str) -> Result<()> {
    resume_config_changes(state_path, saved, current).map(drop)
}

/// Writes `bytes` to `<path>.partial`, fsyncs, and renames it to `path` (`step`
/// names the save for the failpoint between the write and the rename).
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8], step: u64) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
    drop(f);
    failpoint::hit("file.partial_written", step);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", &tmp, e))
}

/// Fsyncs a directory so renames inside it survive a power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync", dir, e))
}
