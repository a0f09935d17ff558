//! Checkpoints: crash-safe save and validating load.
//!
//! A run directory keeps its checkpoints under `checkpoints/`:
//!
//! ```text
//! <run_dir>/checkpoints/
//!   latest                      text file: "ckpt-00000020\n"
//!   ckpt-00000010/
//!     model.safetensors         weights, PyTorch-style names, f32, metadata {"format": "pt"}
//!     optimizer.safetensors     optimizer tensors ("<param>.exp_avg", ...), f32
//!     state.json                step, RNG words, data position, config TOML text,
//!                               goodput totals, extras, format version,
//!                               byte length + SHA-256 of both safetensors files
//!   ckpt-00000020/ ...
//! ```
//!
//! **Atomicity.** Every file is written under a temporary name, fsynced and renamed;
//! the checkpoint is assembled in `ckpt-<step>.tmp/`, fsynced, renamed to
//! `ckpt-<step>/`, and only then is `latest` replaced (again temp + fsync + rename).
//! A crash at any point leaves `latest` naming a complete checkpoint; a leftover
//! `.tmp` directory is ignored by [`load_checkpoint`] and cleared by the next save of
//! the same step. An existing `ckpt-<step>/` is never overwritten.
//!
//! **Validation.** [`load_checkpoint`] checks the format version, each file's length
//! (truncation) and SHA-256 (corruption), the config text (first differing line) and,
//! when given, every tensor's name and shape, returning a typed [`Error`] naming the
//! file and the mismatch. Loading never writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use megamoe_tensor::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::error::{Error, Result};
use crate::goodput::GoodputTotals;
use crate::sha256::sha256_hex;

/// Version of the checkpoint layout written by this build.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;
/// Subdirectory of a run directory holding checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Pointer file naming the newest complete checkpoint directory.
pub const LATEST_FILE: &str = "latest";
/// Model weights file.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Scalar state file.
pub const STATE_FILE: &str = "state.json";

/// One named f32 tensor, row-major: the unit of checkpoint I/O.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// PyTorch-style dotted name, e.g. `layers.3.moe.experts.w_up`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// A tensor from parts (checked when saved).
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        NamedTensor {
            name: name.into(),
            shape,
            data,
        }
    }

    /// Copies a tensor to the host as f32 (BF16 widens exactly; I32 converts to the
    /// nearest f32, exact below 2^24). SYNC: reads the tensor to the host.
    pub fn from_tensor(name: impl Into<String>, tensor: &Tensor) -> Result<Self> {
        // SYNC: checkpoint writes need the values on the host.
        let data = tensor.to_host_f32()?;
        Ok(NamedTensor {
            name: name.into(),
            shape: tensor.dims().to_vec(),
            data,
        })
    }

    /// An f32 tensor on `device` with this data (convert with `to_dtype` for BF16
    /// parameters; values saved from BF16 round-trip exactly).
    pub fn to_tensor(&self, device: Device) -> Result<Tensor> {
        Ok(Tensor::from_vec_f32(
            self.data.clone(),
            self.shape.clone(),
            device,
        )?)
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

/// Length and digest of a file, recorded in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Length in bytes.
    pub bytes: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

/// The on-disk form of `state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    #[serde(flatten)]
    state: TrainState,
    files: BTreeMap<String, FileDigest>,
}

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
    /// The current config TOML; compared line by line (trailing whitespace ignored).
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

/// Saves a checkpoint of `state.step` under `checkpoints_dir` (created if needed) and
/// points `latest` at it. Returns the checkpoint directory.
///
/// Fails with [`Error::CheckpointExists`] if that step was already saved, and with
/// [`Error::CheckpointTensorInvalid`] for an empty or duplicate name or a data
/// length that disagrees with the shape; in every failure case the previous
/// checkpoints and `latest` are untouched.
pub fn save_checkpoint(
    checkpoints_dir: &Path,
    state: &TrainState,
    model: &[NamedTensor],
    optimizer: &[NamedTensor],
) -> Result<PathBuf> {
    validate_tensors(model)?;
    validate_tensors(optimizer)?;
    let name = checkpoint_dir_name(state.step);
    let final_dir = checkpoints_dir.join(&name);
    if final_dir.exists() {
        return Err(Error::CheckpointExists { path: final_dir });
    }
    let tmp_dir = checkpoints_dir.join(format!("{name}.tmp"));
    if tmp_dir.exists() {
        // Debris of a save that crashed; never loaded, safe to clear.
        log::warn!("removing incomplete checkpoint {}", tmp_dir.display());
        std::fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io("remove", &tmp_dir, e))?;
    }
    std::fs::create_dir_all(&tmp_dir).map_err(|e| Error::io("create", &tmp_dir, e))?;

    let mut files = BTreeMap::new();
    for (file, tensors) in [(MODEL_FILE, model), (OPTIMIZER_FILE, optimizer)] {
        let bytes = encode_safetensors(tensors)?;
        write_file_atomic(&tmp_dir.join(file), &bytes)?;
        files.insert(
            file.to_string(),
            FileDigest {
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            },
        );
    }
    let state_file = StateFile {
        format_version: CHECKPOINT_FORMAT_VERSION,
        state: state.clone(),
        files,
    };
    let json = serde_json::to_vec_pretty(&state_file).map_err(|source| Error::Serialize {
        what: "checkpoint state.json",
        source,
    })?;
    write_file_atomic(&tmp_dir.join(STATE_FILE), &json)?;
    sync_dir(&tmp_dir)?;

    std::fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io("rename", &tmp_dir, e))?;
    sync_dir(checkpoints_dir)?;
    write_file_atomic(
        &checkpoints_dir.join(LATEST_FILE),
        format!("{name}\n").as_bytes(),
    )?;
    sync_dir(checkpoints_dir)?;
    log::info!("saved checkpoint {}", final_dir.display());
    Ok(final_dir)
}

/// Finds the checkpoint directory `path` refers to: a checkpoint directory itself
/// (has `state.json`), a checkpoints directory (has `latest`), or a run directory
/// (has `checkpoints/latest`).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        return Err(Error::CheckpointMissing {
            path: path.to_path_buf(),
            reason: "the path does not exist".to_string(),
        });
    }
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.to_path_buf(), path.join(CHECKPOINTS_DIR)] {
        let latest = dir.join(LATEST_FILE);
        if latest.is_file() {
            let text =
                std::fs::read_to_string(&latest).map_err(|e| Error::io("read", &latest, e))?;
            let name = text.trim();
            let target = dir.join(name);
            let valid_name = !name.is_empty() && !name.contains(['/', '\\']) && name != "..";
            if !valid_name || !target.is_dir() {
                return Err(Error::CheckpointMissing {
                    path: latest,
                    reason: format!("it names `{name}`, which is not a checkpoint directory"),
                });
            }
            return Ok(target);
        }
    }
    Err(Error::CheckpointMissing {
        path: path.to_path_buf(),
        reason: format!(
            "found neither {STATE_FILE}, {LATEST_FILE} nor {CHECKPOINTS_DIR}/{LATEST_FILE}"
        ),
    })
}

/// Loads and validates the checkpoint `path` refers to (see [`resolve_checkpoint`]).
pub fn load_checkpoint(path: &Path, expected: &Expected<'_>) -> Result<Checkpoint> {
    let dir = resolve_checkpoint(path)?;
    let state_path = dir.join(STATE_FILE);
    let state_bytes = read_required(&dir, STATE_FILE)?;
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
    let model = load_tensor_file(&dir, MODEL_FILE, &state_file, expected.model)?;
    let optimizer = load_tensor_file(&dir, OPTIMIZER_FILE, &state_file, expected.optimizer)?;
    Ok(Checkpoint {
        dir,
        state: state_file.state,
        model,
        optimizer,
    })
}

/// Step numbers of the complete checkpoints under `checkpoints_dir`, ascending
/// (`.tmp` directories excluded).
pub fn list_checkpoints(checkpoints_dir: &Path) -> Result<Vec<u64>> {
    let mut steps = Vec::new();
    let entries = match std::fs::read_dir(checkpoints_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(steps),
        Err(e) => return Err(Error::io("list", checkpoints_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", checkpoints_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("ckpt-")) else {
            continue;
        };
        if let Ok(step) = step.parse::<u64>() {
            if entry.path().join(STATE_FILE).is_file() {
                steps.push(step);
            }
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// Deletes all but the newest `keep` complete checkpoints (never the one `latest`
/// names). Returns the directories removed.
pub fn prune_checkpoints(checkpoints_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let latest = resolve_checkpoint(checkpoints_dir).ok();
    let steps = list_checkpoints(checkpoints_dir)?;
    let mut removed = Vec::new();
    for &step in steps.iter().rev().skip(keep) {
        let dir = checkpoints_dir.join(checkpoint_dir_name(step));
        if Some(&dir) == latest.as_ref() {
            continue;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
        removed.push(dir);
    }
    Ok(removed)
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
    }
    Ok(())
}

fn encode_safetensors(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b).map_err(|e| {
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

fn load_tensor_file(
    dir: &Path,
    file: &'static str,
    state: &StateFile,
    expected: Option<&[TensorSpec]>,
) -> Result<Vec<NamedTensor>> {
    let path = dir.join(file);
    let bytes = read_required(dir, file)?;
    let digest = state
        .files
        .get(file)
        .ok_or_else(|| Error::CheckpointMalformed {
            path: dir.join(STATE_FILE),
            reason: format!("no length/sha256 recorded for {file}"),
        })?;
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
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::CheckpointMalformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut by_name: BTreeMap<String, NamedTensor> = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::CheckpointMalformed {
                path,
                reason: format!(
                    "tensor {name} has dtype {:?}; only F32 is supported",
                    view.dtype()
                ),
            });
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let shape = view.shape().to_vec();
        by_name.insert(name.clone(), NamedTensor { name, shape, data });
    }
    let Some(expected) = expected else {
        return Ok(by_name.into_values().collect());
    };
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

fn compare_config(state_path: &Path, saved: &str, current: &str) -> Result<()> {
    let saved_lines: Vec<&str> = saved.lines().map(str::trim_end).collect();
    let current_lines: Vec<&str> = current.lines().map(str::trim_end).collect();
    let n = saved_lines.len().max(current_lines.len());
    for i in 0..n {
        let s = saved_lines.get(i).copied();
        let c = current_lines.get(i).copied();
        if s != c {
            return Err(Error::CheckpointConfigMismatch {
                path: state_path.to_path_buf(),
                line: i + 1,
                saved: s.unwrap_or("<end>").to_string(),
                current: c.unwrap_or("<end>").to_string(),
            });
        }
    }
    Ok(())
}

/// Writes `bytes` to `<path>.partial`, fsyncs, and renames it to `path`.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", &tmp, e))
}

/// Fsyncs a directory so renames inside it survive a power loss.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync", dir, e))
}
