//! Sharded checkpoints: what the ranks of a distributed run write.
//!
//! ```text
//! ckpt-00000010/
//!   model-r00000.safetensors    the model pieces rank 0 owns (safetensors, f32)
//!   model-r00001.safetensors    ... one file per rank that owns a piece
//!   optim-r00000.safetensors    the optimizer-state pieces rank 0 owns (f32; bf16 AdamW
//!                               moments stay bf16)
//!   state.json                  scalar state, as in the one-rank layout
//!   index.json                  written last: the commit marker
//! ```
//!
//! A *piece* is a box of a one-rank tensor ([`Slab`]: an offset and a shape per
//! dimension): an expert rank's experts are rows of a bank, a tensor-parallel rank's
//! slice is a range along the split dimension, an FSDP rank's rows a range of dim 0
//! (of its slice). Every rank describes the pieces it holds; the lowest world rank
//! holding a piece owns it (replicas across data ranks write nothing twice) and writes
//! it under the tensor's name into its shard files. `index.json` names, for every
//! one-rank tensor, its shape, dtype and pieces (file, key, box), checks that the
//! pieces tile it exactly (disjoint, covering every value), and records the length and
//! SHA-256 of every shard file and of `state.json`.
//!
//! **Commit.** The shards are written into `ckpt-<step>.tmp/` and fsynced by their
//! ranks; rank 0 writes `state.json` and then `index.json` only after every rank
//! reported its files durable, fsyncs the directory and renames it to `ckpt-<step>/`
//! (the same publication as the one-rank layout). A save that dies at any point leaves
//! a `.tmp` directory, which resume skips.
//!
//! **Loading.** [`ShardReader`] reads any box of any tensor from the pieces that
//! overlap it, reading from each shard file only the rows it needs (the file's header,
//! then a seek). A one-rank checkpoint is read the same way as a degenerate index: one
//! piece per tensor, the whole tensor, in `model.safetensors` / `optimizer.safetensors`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::stored::{decode_values, f32_name, stored_size};
use super::{
    encode_safetensors, read_required, validate_tensors, write_file_atomic, write_state_file,
    FileDigest, NamedTensor, TensorSpec, TrainState, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::sha256::sha256_file_hex;

/// The index of a sharded checkpoint; written last, it is the commit marker.
pub const INDEX_FILE: &str = "index.json";
/// Version of the `index.json` layout written by this build.
pub const INDEX_FORMAT_VERSION: u32 = 1;

/// A box of a tensor: `offset[d] .. offset[d] + shape[d]` along every dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slab {
    /// First index along each dimension.
    pub offset: Vec<usize>,
    /// Extent along each dimension.
    pub shape: Vec<usize>,
}

impl Slab {
    /// The whole tensor of `shape`.
    pub fn whole(shape: &[usize]) -> Slab {
        Slab {
            offset: vec![0; shape.len()],
            shape: shape.to_vec(),
        }
    }

    /// The sub-box of `len` entries from `start` (relative to this box) along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Slab {
        let mut s = self.clone();
        if dim < s.shape.len() {
            s.offset[dim] += start;
            s.shape[dim] = len;
        }
        s
    }

    /// Values it holds.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The box both hold, `None` when they are disjoint (or of different rank).
    pub fn intersect(&self, other: &Slab) -> Option<Slab> {
        if self.shape.len() != other.shape.len() {
            return None;
        }
        let mut out = Slab::whole(&self.shape);
        for d in 0..self.shape.len() {
            let lo = self.offset[d].max(other.offset[d]);
            let hi = (self.offset[d] + self.shape[d]).min(other.offset[d] + other.shape[d]);
            if hi <= lo {
                return None;
            }
            out.offset[d] = lo;
            out.shape[d] = hi - lo;
        }
        Some(out)
    }

    /// Whether it lies inside a tensor of `shape`.
    fn fits(&self, shape: &[usize]) -> bool {
        self.shape.len() == shape.len()
            && (0..shape.len()).all(|d| self.offset[d] + self.shape[d] <= shape[d])
    }
}

/// One piece of a tensor in a sharded checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    /// Shard file holding it.
    pub file: String,
    /// Its name in that file.
    pub key: String,
    /// Where it lies in the one-rank tensor.
    #[serde(flatten)]
    pub slab: Slab,
}

/// A one-rank tensor of a checkpoint and the pieces composing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// One-rank shape.
    pub shape: Vec<usize>,
    /// Element type (safetensors name: `F32`, or `BF16` for bf16 AdamW moments).
    pub dtype: String,
    /// Disjoint pieces covering every value.
    pub pieces: Vec<Piece>,
}

/// The on-disk form of `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    /// [`INDEX_FORMAT_VERSION`].
    pub format_version: u32,
    /// Step of the checkpoint.
    pub step: u64,
    /// Ranks that wrote it.
    pub world: usize,
    /// Length and SHA-256 of every shard file and of `state.json`.
    pub files: BTreeMap<String, FileDigest>,
    /// Model tensors by name.
    pub model: BTreeMap<String, IndexEntry>,
    /// Optimizer tensors by name.
    pub optimizer: BTreeMap<String, IndexEntry>,
}

/// Which of a checkpoint's two tensor sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TensorSet {
    /// Parameters and buffers.
    Model,
    /// Optimizer state.
    Optimizer,
}

impl TensorSet {
    fn prefix(self) -> &'static str {
        match self {
            TensorSet::Model => "model",
            TensorSet::Optimizer => "optim",
        }
    }
}

/// A piece one rank holds: tensor `name` of one-rank shape `global`, the box `slab` of
/// it, and (when saving) the values of that box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldPiece {
    /// Model or optimizer.
    pub set: TensorSet,
    /// Tensor name.
    pub name: String,
    /// One-rank shape.
    pub global: Vec<usize>,
    /// The box this rank holds.
    pub slab: Slab,
    /// Stored element type (safetensors name, [`super::stored_dtype`]).
    #[serde(default = "f32_name")]
    pub dtype: String,
}

/// Shard file of `set` written by `rank`.
pub fn shard_file_name(set: TensorSet, rank: usize) -> String {
    format!("{}-r{rank:05}.safetensors", set.prefix())
}

fn malformed(path: &Path, reason: String) -> Error {
    Error::CheckpointMalformed {
        path: path.to_path_buf(),
        reason,
    }
}

/// Decides which rank writes each piece: the lowest rank holding a box writes it.
/// `held[r]` lists rank r's pieces; returns, per rank, whether it writes each of its
/// pieces, and the index's tensors (file digests still empty). Fails when two ranks
/// disagree on a tensor's shape, a box lies outside its tensor, or the distinct boxes of
/// a tensor overlap or leave values uncovered.
#[allow(clippy::type_complexity)]
pub(crate) fn assign_owners(
    held: &[Vec<HeldPiece>],
) -> Result<(
    Vec<Vec<bool>>,
    BTreeMap<String, IndexEntry>,
    BTreeMap<String, IndexEntry>,
)> {
    let here = Path::new(INDEX_FILE);
    let mut owners = Vec::with_capacity(held.len());
    let mut model: BTreeMap<String, IndexEntry> = BTreeMap::new();
    let mut optimizer: BTreeMap<String, IndexEntry> = BTreeMap::new();
    for (rank, pieces) in held.iter().enumerate() {
        let mut mine = Vec::with_capacity(pieces.len());
        for p in pieces {
            let entries = match p.set {
                TensorSet::Model => &mut model,
                TensorSet::Optimizer => &mut optimizer,
            };
            let e = entries.entry(p.name.clone()).or_insert_with(|| IndexEntry {
                shape: p.global.clone(),
                dtype: p.dtype.clone(),
                pieces: Vec::new(),
            });
            if e.dtype != p.dtype {
                return Err(malformed(
                    here,
                    format!(
                        "rank {rank} holds {} as {}, another rank as {}",
                        p.name, p.dtype, e.dtype
                    ),
                ));
            }
            if e.shape != p.global {
                return Err(malformed(
                    here,
                    format!(
                        "rank {rank} holds {} as part of a {:?} tensor, another rank of a {:?} one",
                        p.name, p.global, e.shape
                    ),
                ));
            }
            if !p.slab.fits(&p.global) {
                return Err(malformed(
                    here,
                    format!(
                        "rank {rank}'s piece {:?} of {} lies outside its shape {:?}",
                        p.slab, p.name, p.global
                    ),
                ));
            }
            let owns = !e.pieces.iter().any(|q| q.slab == p.slab);
            if owns {
                e.pieces.push(Piece {
                    file: shard_file_name(p.set, rank),
                    key: p.name.clone(),
                    slab: p.slab.clone(),
                });
            }
            mine.push(owns);
        }
        owners.push(mine);
    }
    for (name, e) in model.iter().chain(&optimizer) {
        check_tiling(name, e)?;
    }
    Ok((owners, model, optimizer))
}

/// The pieces of `e` are disjoint and cover all of it.
fn check_tiling(name: &str, e: &IndexEntry) -> Result<()> {
    let here = Path::new(INDEX_FILE);
    for (i, a) in e.pieces.iter().enumerate() {
        if let Some(b) = e.pieces[i + 1..]
            .iter()
            .find(|b| a.slab.intersect(&b.slab).is_some())
        {
            return Err(malformed(
                here,
                format!(
                    "pieces {:?} ({}) and {:?} ({}) of {name} overlap",
                    a.slab, a.file, b.slab, b.file
                ),
            ));
        }
    }
    let covered: usize = e.pieces.iter().map(|p| p.slab.numel()).sum();
    let numel: usize = e.shape.iter().product();
    if covered != numel {
        return Err(malformed(
            here,
            format!("the pieces of {name} cover {covered} of its {numel} values"),
        ));
    }
    Ok(())
}

/// Writes this rank's shard files into `tmp_dir` (fsynced; a file only for a set it
/// owns pieces of): the pieces `pieces` with their values `values` where `owned`.
/// Returns each written file's digest.
pub(crate) fn write_shards(
    tmp_dir: &Path,
    rank: usize,
    step: u64,
    pieces: &[HeldPiece],
    values: &[NamedTensor],
    owned: &[bool],
) -> Result<BTreeMap<String, FileDigest>> {
    let mut out = BTreeMap::new();
    for set in [TensorSet::Model, TensorSet::Optimizer] {
        let mine: Vec<NamedTensor> = pieces
            .iter()
            .zip(values)
            .zip(owned)
            .filter(|((p, _), &own)| own && p.set == set)
            .map(|((_, v), _)| v.clone())
            .collect();
        if mine.is_empty() {
            continue;
        }
        validate_tensors(&mine)?;
        let bytes = encode_safetensors(&mine)?;
        let file = shard_file_name(set, rank);
        write_file_atomic(&tmp_dir.join(&file), &bytes, step)?;
        out.insert(file, FileDigest::of(&bytes));
    }
    failpoint::hit("checkpoint.shard_written", step);
    Ok(out)
}

/// Rank 0's end of a sharded save: writes `state.json`, then `index.json` (the tensors
/// `model` / `optimizer`, the shard digests `files`) into `tmp_dir`, fsyncs it. The
/// caller publishes the directory.
pub(crate) fn write_index(
    tmp_dir: &Path,
    state: &TrainState,
    world: usize,
    mut files: BTreeMap<String, FileDigest>,
    model: BTreeMap<String, IndexEntry>,
    optimizer: BTreeMap<String, IndexEntry>,
) -> Result<()> {
    let step = state.step;
    for e in model.values().chain(optimizer.values()) {
        if let Some(p) = e.pieces.iter().find(|p| !files.contains_key(&p.file)) {
            return Err(malformed(
                Path::new(INDEX_FILE),
                format!("{} names {}, which no rank wrote", p.key, p.file),
            ));
        }
    }
    write_state_file(tmp_dir, state, &mut files)?;
    let index = ShardIndex {
        format_version: INDEX_FORMAT_VERSION,
        step,
        world,
        files,
        model,
        optimizer,
    };
    let json = serde_json::to_vec_pretty(&index).map_err(|source| Error::Serialize {
        what: "checkpoint index.json",
        source,
    })?;
    write_file_atomic(&tmp_dir.join(INDEX_FILE), &json, step)?;
    super::sync_dir(tmp_dir)?;
    failpoint::hit("checkpoint.index_written", step);
    Ok(())
}

/// Reads `index.json` of `dir` and checks its version and every file's length and
/// SHA-256 (streamed: no file is held whole).
pub(crate) fn verify_sharded(dir: &Path) -> Result<ShardIndex> {
    let path = dir.join(INDEX_FILE);
    let bytes = read_required(dir, INDEX_FILE)?;
    let index: ShardIndex =
        serde_json::from_slice(&bytes).map_err(|e| malformed(&path, e.to_string()))?;
    if index.format_version != INDEX_FORMAT_VERSION {
        return Err(Error::CheckpointVersion {
            path,
            found: index.format_version,
            supported: INDEX_FORMAT_VERSION,
        });
    }
    if !index.files.contains_key(STATE_FILE) {
        return Err(malformed(
            &path,
            format!("no length/sha256 recorded for {STATE_FILE}"),
        ));
    }
    for e in index.model.values().chain(index.optimizer.values()) {
        if let Some(p) = e.pieces.iter().find(|p| !index.files.contains_key(&p.file)) {
            return Err(malformed(
                &path,
                format!("{} names {}, which has no length/sha256", p.key, p.file),
            ));
        }
    }
    verify_files(dir, &index.files)?;
    Ok(index)
}

/// Checks the length and SHA-256 of each of `files` in `dir` (streamed).
pub(crate) fn verify_files(dir: &Path, files: &BTreeMap<String, FileDigest>) -> Result<()> {
    for (file, digest) in files {
        let path = dir.join(file);
        let (bytes, sha) = sha256_file_hex(&path).map_err(|e| Error::io("read", &path, e))?;
        if bytes != digest.bytes {
            return Err(Error::CheckpointTruncated {
                path,
                expected: digest.bytes,
                actual: bytes,
            });
        }
        if sha != digest.sha256 {
            return Err(Error::CheckpointCorrupt {
                path,
                expected: digest.sha256.clone(),
                actual: sha,
            });
        }
    }
    Ok(())
}

/// Checks a checkpoint's tensors (`entries`, described by `path`) against `expected`:
/// none missing, none extra, same shapes.
pub(crate) fn check_specs(
    path: &Path,
    entries: &BTreeMap<String, IndexEntry>,
    expected: &[TensorSpec],
) -> Result<()> {
    for spec in expected {
        let e = entries
            .get(&spec.name)
            .ok_or_else(|| Error::CheckpointTensorMissing {
                path: path.to_path_buf(),
                tensor: spec.name.clone(),
            })?;
        if e.shape != spec.shape {
            return Err(Error::CheckpointShapeMismatch {
                path: path.to_path_buf(),
                tensor: spec.name.clone(),
                expected: spec.shape.clone(),
                found: e.shape.clone(),
            });
        }
    }
    if entries.len() != expected.len() {
        let names: std::collections::HashSet<&str> =
            expected.iter().map(|s| s.name.as_str()).collect();
        if let Some(extra) = entries.keys().find(|k| !names.contains(k.as_str())) {
            return Err(Error::CheckpointTensorUnexpected {
                path: path.to_path_buf(),
                tensor: extra.clone(),
            });
        }
    }
    Ok(())
}

/// Where a tensor's bytes lie in a safetensors file.
#[derive(Debug, Clone)]
struct Stored {
    dtype: String,
    shape: Vec<usize>,
    /// Byte range from the start of the file.
    begin: u64,
    end: u64,
}

/// Reads any box of any tensor of a checkpoint (sharded or one-rank) from the pieces
/// overlapping it (see the module doc). Not verified here: the caller verified the
/// checkpoint ([`super::verify_any`]) on one rank first.
#[derive(Debug)]
pub struct ShardReader {
    dir: PathBuf,
    index: ShardIndex,
    headers: RefCell<HashMap<String, Rc<HashMap<String, Stored>>>>,
}

impl ShardReader {
    /// Opens checkpoint directory `dir`: its `index.json`, or for a one-rank checkpoint
    /// the headers of its two tensor files (one piece per tensor).
    pub fn open(dir: &Path) -> Result<ShardReader> {
        let reader = |index| ShardReader {
            dir: dir.to_path_buf(),
            index,
            headers: RefCell::new(HashMap::new()),
        };
        if dir.join(INDEX_FILE).is_file() {
            let path = dir.join(INDEX_FILE);
            let bytes = read_required(dir, INDEX_FILE)?;
            let index =
                serde_json::from_slice(&bytes).map_err(|e| malformed(&path, e.to_string()))?;
            return Ok(reader(index));
        }
        let mut r = reader(ShardIndex {
            format_version: INDEX_FORMAT_VERSION,
            step: 0,
            world: 1,
            files: BTreeMap::new(),
            model: BTreeMap::new(),
            optimizer: BTreeMap::new(),
        });
        for (file, set) in [
            (MODEL_FILE, TensorSet::Model),
            (OPTIMIZER_FILE, TensorSet::Optimizer),
        ] {
            let header = r.header(file)?;
            let entries: BTreeMap<String, IndexEntry> = header
                .iter()
                .map(|(name, s)| {
                    let entry = IndexEntry {
                        shape: s.shape.clone(),
                        dtype: s.dtype.clone(),
                        pieces: vec![Piece {
                            file: file.to_string(),
                            key: name.clone(),
                            slab: Slab::whole(&s.shape),
                        }],
                    };
                    (name.clone(), entry)
                })
                .collect();
            match set {
                TensorSet::Model => r.index.model = entries,
                TensorSet::Optimizer => r.index.optimizer = entries,
            }
        }
        Ok(r)
    }

    /// The index (degenerate for a one-rank checkpoint).
    pub fn index(&self) -> &ShardIndex {
        &self.index
    }

    /// Tensor `name` of `set` whole.
    pub fn read_whole(&self, set: TensorSet, name: &str) -> Result<NamedTensor> {
        let shape = self.entry(set, name)?.shape.clone();
        let data = self.read(set, name, &Slab::whole(&shape))?;
        Ok(NamedTensor::new(name, shape, data).with_dtype(self.dtype(set, name)?))
    }

    /// The stored element type of tensor `name` of `set` (f32 or bf16).
    pub fn dtype(&self, set: TensorSet, name: &str) -> Result<megamoe_tensor::DType> {
        let entry = self.entry(set, name)?;
        stored_size(&entry.dtype).map(|(_, d)| d).ok_or_else(|| {
            malformed(
                &self.dir.join(INDEX_FILE),
                format!(
                    "{name} has dtype {}; only F32 and BF16 are supported",
                    entry.dtype
                ),
            )
        })
    }

    fn entry(&self, set: TensorSet, name: &str) -> Result<&IndexEntry> {
        let entries = match set {
            TensorSet::Model => &self.index.model,
            TensorSet::Optimizer => &self.index.optimizer,
        };
        entries
            .get(name)
            .ok_or_else(|| Error::CheckpointTensorMissing {
                path: self.dir.clone(),
                tensor: name.to_string(),
            })
    }

    /// The values of box `want` of tensor `name` of `set`, row-major, read from the
    /// pieces overlapping it (from each only the rows of dim 0 it needs).
    pub fn read(&self, set: TensorSet, name: &str, want: &Slab) -> Result<Vec<f32>> {
        let entry = self.entry(set, name)?;
        if !want.fits(&entry.shape) {
            return Err(Error::CheckpointShapeMismatch {
                path: self.dir.clone(),
                tensor: name.to_string(),
                expected: want
                    .offset
                    .iter()
                    .zip(&want.shape)
                    .map(|(o, s)| o + s)
                    .collect(),
                found: entry.shape.clone(),
            });
        }
        let size = stored_size(&entry.dtype).map(|(s, _)| s).ok_or_else(|| {
            malformed(
                &self.dir.join(INDEX_FILE),
                format!(
                    "{name} has dtype {}; only F32 and BF16 are supported",
                    entry.dtype
                ),
            )
        })?;
        let mut out = vec![0f32; want.numel()];
        let mut covered = 0;
        for piece in &entry.pieces {
            let Some(part) = piece.slab.intersect(want).or_else(|| {
                // Zero-dimensional tensors: the one piece is the whole value.
                want.shape.is_empty().then(|| want.clone())
            }) else {
                continue;
            };
            let path = self.dir.join(&piece.file);
            let header = self.header(&piece.file)?;
            let stored = header
                .get(&piece.key)
                .ok_or_else(|| malformed(&path, format!("no tensor {} in it", piece.key)))?;
            if stored.dtype != entry.dtype || stored.shape != piece.slab.shape {
                return Err(malformed(
                    &path,
                    format!(
                        "{} is {} {:?}; the index says {} {:?}",
                        piece.key, stored.dtype, stored.shape, entry.dtype, piece.slab.shape
                    ),
                ));
            }
            // The rows of the piece the overlap needs, read in one go.
            let row: usize = piece.slab.shape.iter().skip(1).product();
            let (r0, rows) = match part.shape.first() {
                Some(&n) => (part.offset[0] - piece.slab.offset[0], n),
                None => (0, 1),
            };
            let begin = stored.begin + (r0 * row * size) as u64;
            let len = rows * row * size;
            if begin + len as u64 > stored.end {
                return Err(malformed(
                    &path,
                    format!("{} is shorter than its shape", piece.key),
                ));
            }
            let mut bytes = vec![0u8; len];
            let mut f = std::fs::File::open(&path).map_err(|e| Error::io("open", &path, e))?;
            f.seek(SeekFrom::Start(begin))
                .and_then(|_| f.read_exact(&mut bytes))
                .map_err(|e| Error::io("read", &path, e))?;
            let vals = decode_values(&bytes, size);
            // `vals` is the box rows r0.. of the piece, all of dims 1..
            let mut src_box = piece.slab.clone();
            if let Some(first) = src_box.shape.first_mut() {
                *first = rows;
                src_box.offset[0] = part.offset[0];
            }
            copy_box(&vals, &src_box, &mut out, want, &part);
            covered += part.numel();
        }
        if covered != want.numel() {
            return Err(malformed(
                &self.dir.join(INDEX_FILE),
                format!(
                    "the pieces of {name} cover {covered} of the {} values asked for",
                    want.numel()
                ),
            ));
        }
        Ok(out)
    }

    /// The parsed safetensors header of `file` (cached).
    fn header(&self, file: &str) -> Result<Rc<HashMap<String, Stored>>> {
        if let Some(h) = self.headers.borrow().get(file) {
            return Ok(h.clone());
        }
        let path = self.dir.join(file);
        let mut f = std::fs::File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                malformed(&path, "the file is missing".to_string())
            } else {
                Error::io("open", &path, e)
            }
        })?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|e| Error::io("read", &path, e))?;
        let n = u64::from_le_bytes(n);
        let file_len = f.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
        if n > file_len.saturating_sub(8) {
            return Err(malformed(
                &path,
                format!("header of {n} bytes exceeds the file"),
            ));
        }
        let mut json = vec![0u8; n as usize];
        f.read_exact(&mut json)
            .map_err(|e| Error::io("read", &path, e))?;
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&json).map_err(|e| malformed(&path, e.to_string()))?;
        let data_start = 8 + n;
        let mut out = HashMap::new();
        for (name, v) in raw {
            if name == "__metadata__" {
                continue;
            }
            #[derive(Deserialize)]
            struct Info {
                dtype: String,
                shape: Vec<usize>,
                data_offsets: [u64; 2],
            }
            let info: Info = serde_json::from_value(v)
                .map_err(|e| malformed(&path, format!("header of {name}: {e}")))?;
            let (begin, end) = (
                data_start + info.data_offsets[0],
                data_start + info.data_offsets[1],
            );
            if end > file_len || begin > end {
                return Err(malformed(
                    &path,
                    format!("{name} lies past the end of the file"),
                ));
            }
            out.insert(
                name,
                Stored {
                    dtype: info.dtype,
                    shape: info.shape,
                    begin,
                    end,
                },
            );
        }
        let h = Rc::new(out);
        self.headers
            .borrow_mut()
            .insert(file.to_string(), h.clone());
        Ok(h)
    }
}

/// Copies box `part` from `src` (the values of box `src_box`, row-major) into `dst`
/// (the values of box `dst_box`); `part` lies inside both.
fn copy_box(src: &[f32], src_box: &Slab, dst: &mut [f32], dst_box: &Slab, part: &Slab) {
    let nd = part.shape.len();
    if nd == 0 {
        if let (Some(d), Some(s)) = (dst.first_mut(), src.first()) {
            *d = *s;
        }
        return;
    }
    let strides = |shape: &[usize]| {
        let mut s = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    };
    let (ss, ds) = (strides(&src_box.shape), strides(&dst_box.shape));
    let run = part.shape[nd - 1];
    let outer: usize = part.shape[..nd - 1].iter().product();
    let mut idx = vec![0usize; nd - 1];
    for _ in 0..outer {
        let (mut so, mut dof) = (0, 0);
        for d in 0..nd {
            let at = part.offset[d] + if d < nd - 1 { idx[d] } else { 0 };
            so += (at - src_box.offset[d]) * ss[d];
            dof += (at - dst_box.offset[d]) * ds[d];
        }
        dst[dof..dof + run].copy_from_slice(&src[so..so + run]);
        for d in (0..nd - 1).rev() {
            idx[d] += 1;
            if idx[d] < part.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn piece(set: TensorSet, name: &str, global: &[usize], slab: Slab) -> HeldPiece {
        HeldPiece {
            set,
            name: name.to_string(),
            global: global.to_vec(),
            slab,
            dtype: f32_name(),
        }
    }

    #[test]
    fn the_lowest_rank_holding_a_box_writes_it_and_gaps_or_overlaps_are_refused() {
        let g = [4, 6];
        let whole = Slab::whole(&g);
        let top = whole.narrow(0, 0, 2);
        let bottom = whole.narrow(0, 2, 2);
        // Ranks 0 and 2 hold the top rows, 1 and 3 the bottom (dp2 x ep2 experts).
        let held: Vec<Vec<HeldPiece>> = [&top, &bottom, &top, &bottom]
            .iter()
            .map(|s| vec![piece(TensorSet::Model, "w", &g, (*s).clone())])
            .collect();
        let (owners, model, _) = assign_owners(&held).unwrap();
        assert_eq!(
            owners,
            vec![vec![true], vec![true], vec![false], vec![false]]
        );
        let files: Vec<&str> = model["w"].pieces.iter().map(|p| p.file.as_str()).collect();
        assert_eq!(
            files,
            ["model-r00000.safetensors", "model-r00001.safetensors"]
        );

        let gap = vec![vec![piece(TensorSet::Model, "w", &g, top.clone())]];
        let err = assign_owners(&gap).unwrap_err().to_string();
        assert!(err.contains("cover 12 of its 24"), "{err}");
        let overlap = vec![
            vec![piece(TensorSet::Model, "w", &g, whole.narrow(0, 0, 3))],
            vec![piece(TensorSet::Model, "w", &g, whole.narrow(0, 1, 3))],
        ];
        assert!(assign_owners(&overlap)
            .unwrap_err()
            .to_string()
            .contains("overlap"));
    }

    #[test]
    fn copy_box_moves_the_overlap_of_two_boxes() {
        // A 4x6 tensor with value 10*row + col; the source holds columns 2..5 of rows
        // 1..4, the destination wants rows 0..3 of columns 3..6.
        let val = |r: usize, c: usize| (10 * r + c) as f32;
        let src_box = Slab {
            offset: vec![1, 2],
            shape: vec![3, 3],
        };
        let src: Vec<f32> = (1..4)
            .flat_map(|r| (2..5).map(move |c| val(r, c)))
            .collect();
        let dst_box = Slab {
            offset: vec![0, 3],
            shape: vec![3, 3],
        };
        let part = src_box.intersect(&dst_box).unwrap();
        assert_eq!(
            part,
            Slab {
                offset: vec![1, 3],
                shape: vec![2, 2]
            }
        );
        let mut dst = vec![-1f32; 9];
        copy_box(&src, &src_box, &mut dst, &dst_box, &part);
        assert_eq!(dst, [-1., -1., -1., 13., 14., -1., 23., 24., -1.]);
    }
}
