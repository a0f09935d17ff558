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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    const CONFIG: &str = "[model]\nhidden = 64\nlayers = 2\n\n[train]\nsteps = 20\n";

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            rng: vec![0xDEAD_BEEF, step],
            optimizer_steps: step - 1,
            data: DataPosition {
                source: "synthetic".into(),
                fingerprint: 0x1234,
                seed: 7,
                seq_len: 32,
                sequences_consumed: step * 8,
            },
            config_toml: CONFIG.to_string(),
            goodput: GoodputTotals {
                wall_s: 12.5,
                step_s: 10.0,
                ..Default::default()
            },
            extra: BTreeMap::from([("adam_step".to_string(), serde_json::json!(step))]),
        }
    }

    fn model(scale: f32) -> Vec<NamedTensor> {
        vec![
            NamedTensor::new(
                "embed.weight",
                vec![4, 3],
                (0..12).map(|i| i as f32 * scale).collect(),
            ),
            NamedTensor::new(
                "layers.0.norm.weight",
                vec![3],
                vec![1.0, -0.5, f32::MIN_POSITIVE],
            ),
            NamedTensor::new("scalar", vec![], vec![std::f32::consts::PI]),
        ]
    }

    fn optimizer() -> Vec<NamedTensor> {
        vec![NamedTensor::new(
            "embed.weight.exp_avg",
            vec![4, 3],
            vec![0.25; 12],
        )]
    }

    fn specs(t: &[NamedTensor]) -> Vec<TensorSpec> {
        t.iter().map(NamedTensor::spec).collect()
    }

    #[test]
    fn save_then_load_round_trips_everything() {
        let dir = TestDir::new("ckpt_round_trip");
        let ckpts = dir.path().join(CHECKPOINTS_DIR);
        let saved = save_checkpoint(&ckpts, &state(10), &model(1.0), &optimizer()).unwrap();
        assert_eq!(saved, ckpts.join("ckpt-00000010"));
        let m = model(1.0);
        let o = optimizer();
        let (ms, os) = (specs(&m), specs(&o));
        let expected = Expected {
            config_toml: Some(CONFIG),
            model: Some(&ms),
            optimizer: Some(&os),
        };
        // Run dir, checkpoints dir and checkpoint dir all resolve to the same one.
        for p in [dir.path().to_path_buf(), ckpts.clone(), saved.clone()] {
            let c = load_checkpoint(&p, &expected).unwrap();
            assert_eq!(c.dir, saved);
            assert_eq!(c.state, state(10));
            assert_eq!(c.model, m);
            assert_eq!(c.optimizer, o);
        }
        // Without expectations tensors come back sorted by name.
        let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
        let names: Vec<_> = c.model.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["embed.weight", "layers.0.norm.weight", "scalar"]);
        // No temporary files remain.
        let leftovers: Vec<_> = std::fs::read_dir(&saved)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("partial") || n.contains("tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn safetensors_file_layout_follows_the_published_format() {
        // Format (huggingface/safetensors README): u64 LE header length N, then N
        // bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
        // then the raw little-endian data.
        let dir = TestDir::new("ckpt_layout");
        let saved = save_checkpoint(dir.path(), &state(1), &model(2.0), &[]).unwrap();
        let bytes = std::fs::read(saved.join(MODEL_FILE)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["__metadata__"]["format"], "pt");
        assert_eq!(header["embed.weight"]["dtype"], "F32");
        assert_eq!(header["embed.weight"]["shape"], serde_json::json!([4, 3]));
        let [start, end] = [0, 1]
            .map(|i| header["embed.weight"]["data_offsets"][i].as_u64().unwrap() as usize + 8 + n);
        let values: Vec<f32> = bytes[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want: Vec<f32> = (0..12).map(|i| i as f32 * 2.0).collect();
        assert_eq!(values, want);
    }

    #[test]
    fn truncated_model_file_is_named_error() {
        let dir = TestDir::new("ckpt_truncated");
        let saved = save_checkpoint(dir.path(), &state(3), &model(1.0), &optimizer()).unwrap();
        let file = saved.join(MODEL_FILE);
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
        match &err {
            Error::CheckpointTruncated {
                path,
                expected,
                actual,
            } => {
                assert_eq!(path, &file);
                assert_eq!((*expected, *actual), (len, len - 5));
            }
            other => panic!("wrong error: {other}"),
        }
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }

    #[test]
    fn flipped_byte_is_corrupt_error() {
        let dir = TestDir::new("ckpt_corrupt");
        let saved = save_checkpoint(dir.path(), &state(3), &model(1.0), &optimizer()).unwrap();
        let file = saved.join(OPTIMIZER_FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
        let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
        assert!(matches!(err, Error::CheckpointCorrupt { .. }), "{err}");
        assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
    }

    #[test]
    fn crash_leaving_tmp_dir_keeps_latest_loadable_and_next_save_succeeds() {
        let dir = TestDir::new("ckpt_crash");
        save_checkpoint(dir.path(), &state(10), &model(1.0), &optimizer()).unwrap();
        // Simulate a crash during the save of step 20: a partial temp dir, a
        // half-written file, no rename, `latest` not updated.
        let tmp = dir.path().join("ckpt-00000020.tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("model.safetensors.partial"), b"\x08\x00\x00").unwrap();
        let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
        assert_eq!(c.state.step, 10);
        assert_eq!(list_checkpoints(dir.path()).unwrap(), [10]);
        // The retried save clears the debris and publishes step 20.
        let saved = save_checkpoint(dir.path(), &state(20), &model(3.0), &optimizer()).unwrap();
        assert!(!tmp.exists());
        let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
        assert_eq!((c.dir, c.state.step), (saved, 20));
    }

    #[test]
    fn crash_after_rename_before_latest_update_loads_previous() {
        let dir = TestDir::new("ckpt_crash_latest");
        save_checkpoint(dir.path(), &state(10), &model(1.0), &optimizer()).unwrap();
        let latest_before = std::fs::read(dir.path().join(LATEST_FILE)).unwrap();
        save_checkpoint(dir.path(), &state(20), &model(1.0), &optimizer()).unwrap();
        // Roll `latest` back, as if the process died right before replacing it.
        std::fs::write(dir.path().join(LATEST_FILE), latest_before).unwrap();
        assert_eq!(
            load_checkpoint(dir.path(), &Expected::default())
                .unwrap()
                .state
                .step,
            10
        );
    }

    #[test]
    fn other_config_is_error_naming_first_differing_line() {
        let dir = TestDir::new("ckpt_config");
        save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
        let other = CONFIG.replace("layers = 2", "layers = 4");
        let expected = Expected {
            config_toml: Some(&other),
            ..Default::default()
        };
        let err = load_checkpoint(dir.path(), &expected).unwrap_err();
        match &err {
            Error::CheckpointConfigMismatch {
                line,
                saved,
                current,
                ..
            } => {
                assert_eq!(*line, 3);
                assert_eq!(saved, "layers = 2");
                assert_eq!(current, "layers = 4");
            }
            other => panic!("wrong error: {other}"),
        }
        // Trailing whitespace and CRLF line ends are not differences.
        let crlf = CONFIG.replace('\n', "  \r\n");
        let same = Expected {
            config_toml: Some(&crlf),
            ..Default::default()
        };
        load_checkpoint(dir.path(), &same).unwrap();
    }

    #[test]
    fn shape_missing_and_unexpected_tensors_are_named_errors() {
        let dir = TestDir::new("ckpt_shapes");
        save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
        let mut want = specs(&model(1.0));
        want[0].shape = vec![4, 5];
        let err = load_checkpoint(
            dir.path(),
            &Expected {
                model: Some(&want),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "checkpoint file {}: tensor embed.weight expected shape [4, 5], got [4, 3]",
                dir.path().join("ckpt-00000005").join(MODEL_FILE).display()
            )
        );

        let mut want = specs(&model(1.0));
        want.push(TensorSpec {
            name: "lm_head.weight".into(),
            shape: vec![3, 4],
        });
        let err = load_checkpoint(
            dir.path(),
            &Expected {
                model: Some(&want),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::CheckpointTensorMissing { tensor, .. } if tensor == "lm_head.weight"),
            "{err}"
        );

        let want = specs(&model(1.0))[..2].to_vec();
        let err = load_checkpoint(
            dir.path(),
            &Expected {
                model: Some(&want),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::CheckpointTensorUnexpected { tensor, .. } if tensor == "scalar"),
            "{err}"
        );
    }

    #[test]
    fn missing_checkpoint_and_missing_file_are_named_errors() {
        let dir = TestDir::new("ckpt_missing");
        let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
        assert!(matches!(err, Error::CheckpointMissing { .. }), "{err}");
        let err = load_checkpoint(&dir.path().join("nope"), &Expected::default()).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");

        let saved = save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
        std::fs::remove_file(saved.join(OPTIMIZER_FILE)).unwrap();
        let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::CheckpointFileMissing {
                    file: OPTIMIZER_FILE,
                    ..
                }
            ),
            "{err}"
        );

        std::fs::write(dir.path().join(LATEST_FILE), "ckpt-00000099\n").unwrap();
        let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
        assert!(err.to_string().contains("ckpt-00000099"), "{err}");
    }

    #[test]
    fn other_format_version_is_error() {
        let dir = TestDir::new("ckpt_version");
        let saved = save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
        let path = saved.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("\"format_version\": 1", "\"format_version\": 99"),
        )
        .unwrap();
        let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::CheckpointVersion {
                    found: 99,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn existing_step_or_bad_tensor_is_refused_without_touching_disk() {
        let dir = TestDir::new("ckpt_refuse");
        let saved = save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
        let before = std::fs::read(saved.join(MODEL_FILE)).unwrap();
        let err = save_checkpoint(dir.path(), &state(5), &model(9.0), &optimizer()).unwrap_err();
        assert!(matches!(err, Error::CheckpointExists { .. }), "{err}");
        assert_eq!(std::fs::read(saved.join(MODEL_FILE)).unwrap(), before);

        let mut bad = model(1.0);
        bad[1].data.pop();
        let err = save_checkpoint(dir.path(), &state(6), &bad, &optimizer()).unwrap_err();
        assert!(err.to_string().contains("layers.0.norm.weight"), "{err}");
        let dup = vec![model(1.0)[0].clone(), model(1.0)[0].clone()];
        let err = save_checkpoint(dir.path(), &state(6), &dup, &optimizer()).unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
        assert_eq!(list_checkpoints(dir.path()).unwrap(), [5]);
        assert_eq!(
            load_checkpoint(dir.path(), &Expected::default())
                .unwrap()
                .state
                .step,
            5
        );
    }

    #[test]
    fn tensor_conversion_round_trips_f32_and_bf16_values() {
        use megamoe_tensor::DType;
        let t = Tensor::from_vec_f32(vec![1.0, -2.5, 3.25, 1e-3], vec![2, 2], Device::Cpu).unwrap();
        let n = NamedTensor::from_tensor("w", &t).unwrap();
        assert_eq!(
            (n.shape.as_slice(), n.data.as_slice()),
            (&[2, 2][..], &[1.0, -2.5, 3.25, 1e-3][..])
        );
        assert_eq!(
            n.to_tensor(Device::Cpu).unwrap().to_host_f32().unwrap(),
            n.data
        );
        // BF16 keeps 8 mantissa bits: 1e-3 becomes the nearest bf16, and saving that
        // as f32 then converting back gives the same bf16 bits.
        let b = t.to_dtype(DType::BF16).unwrap();
        let saved = NamedTensor::from_tensor("w", &b).unwrap();
        let back = saved
            .to_tensor(Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(back.to_host_bf16().unwrap(), b.to_host_bf16().unwrap());
    }

    #[test]
    fn prune_keeps_newest_and_latest() {
        let dir = TestDir::new("ckpt_prune");
        for step in [1, 2, 3, 4] {
            save_checkpoint(dir.path(), &state(step), &model(1.0), &optimizer()).unwrap();
        }
        let removed = prune_checkpoints(dir.path(), 2).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(list_checkpoints(dir.path()).unwrap(), [3, 4]);
        assert_eq!(
            load_checkpoint(dir.path(), &Expected::default())
                .unwrap()
                .state
                .step,
            4
        );
    }
}
