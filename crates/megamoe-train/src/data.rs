//! Training data: where token sequences come from ([`DataSource`]) and the
//! deterministic order they are read in ([`Batcher`]).
//!
//! Two sources:
//! - **synthetic** (the default, [`DataSpec::Synthetic`]): the embedded generator of
//!   [`crate::synthetic`], an endless stream; train sequence `p` is generated from
//!   key `mix(mix(seed, TRAIN), p)`, held-out sequence `i` from `mix(HELDOUT, i)`
//!   (independent of the seed, so every run evaluates on the same text).
//! - **text** (`--data PATH`, [`DataSpec::Path`]): one UTF-8 file or a directory of
//!   them (recursively, in sorted path order, hidden entries skipped), tokenized and
//!   concatenated. The stream is cut into windows of `T + 1` tokens with stride `T`;
//!   the last 5 % of windows (at least one) are held out. Training windows are read
//!   in a fresh permutation each epoch, derived from `(seed, epoch)`.
//!
//! A batch is `B` sequences of `T + 1` tokens: `inputs = seq[..T]`,
//! `targets = seq[1..]`. The whole reading state is one counter, the number of
//! sequences consumed, so [`DataPosition`] is tiny and a resumed run reads
//! bit-identical batches.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::{mix, Fnv1a, SplitMix64};
use crate::synthetic::{push_sample, SYNTHETIC_DOMAINS};
use crate::tokenizer::Tokenizer;

/// Index of a data domain (synthetic: into [`SYNTHETIC_DOMAINS`]; text: always 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DomainId(pub u16);

/// Which data the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    /// The embedded synthetic multi-domain corpus.
    Synthetic,
    /// A UTF-8 text file, or a directory searched recursively for files.
    Path(PathBuf),
}

/// Which part of a source a sequence comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    /// Training data.
    Train,
    /// Held-out data for eval; never returned by a training [`Batcher`].
    Heldout,
}

/// Stream tags keeping train and held-out synthetic keys apart.
const TRAIN_TAG: u64 = 0x7452_4149_4E00_0001;
const HELDOUT_TAG: u64 = 0x4845_4C44_4F55_5401;
/// Version of the synthetic generator; bump when its output changes, so old data
/// positions are rejected instead of silently reading other text.
const SYNTHETIC_VERSION: &str = "synthetic-v1";
/// Fraction of text windows held out for eval (at least one window).
const HELDOUT_FRACTION: f64 = 0.05;

/// One sequence of `T + 1` tokens and its domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids, length `T + 1`.
    pub tokens: Vec<u32>,
    /// The domain every token of it belongs to.
    pub domain: DomainId,
}

/// A tokenized corpus plus its tokenizer.
#[derive(Debug)]
pub struct DataSource {
    name: String,
    fingerprint: u64,
    tokenizer: Tokenizer,
    corpus: Corpus,
}

#[derive(Debug)]
enum Corpus {
    Synthetic,
    Text { tokens: Vec<u32> },
}

impl DataSource {
    /// Opens the data a [`DataSpec`] names.
    pub fn open(spec: &DataSpec, tokenizer: Tokenizer) -> Result<Self> {
        match spec {
            DataSpec::Synthetic => Ok(Self::synthetic(tokenizer)),
            DataSpec::Path(path) => Self::from_path(path, tokenizer),
        }
    }

    /// The embedded synthetic corpus.
    pub fn synthetic(tokenizer: Tokenizer) -> Self {
        let mut h = Fnv1a::new();
        h.update(SYNTHETIC_VERSION.as_bytes());
        h.update(tokenizer.name().as_bytes());
        DataSource {
            name: "synthetic".to_string(),
            fingerprint: h.finish(),
            tokenizer,
            corpus: Corpus::Synthetic,
        }
    }

    /// Reads a text file, or every file below a directory (sorted, recursive).
    pub fn from_path(path: &Path, tokenizer: Tokenizer) -> Result<Self> {
        let files = list_text_files(path)?;
        let mut tokens = Vec::new();
        let mut h = Fnv1a::new();
        h.update(tokenizer.name().as_bytes());
        for file in &files {
            let bytes = std::fs::read(file).map_err(|source| Error::DataUnreadable {
                path: file.clone(),
                source,
            })?;
            let text = std::str::from_utf8(&bytes).map_err(|e| Error::DataNotText {
                path: file.clone(),
                offset: e.valid_up_to(),
            })?;
            tokens.extend(tokenizer.encode(text)?);
        }
        if tokens.is_empty() {
            return Err(Error::DataEmpty {
                path: path.to_path_buf(),
            });
        }
        for t in &tokens {
            h.update(&t.to_le_bytes());
        }
        Ok(DataSource {
            name: path.display().to_string(),
            fingerprint: h.finish(),
            tokenizer,
            corpus: Corpus::Text { tokens },
        })
    }

    /// "synthetic" or the data path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A hash of the corpus content and tokenizer, stored in [`DataPosition`].
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The tokenizer the corpus was encoded with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Names of the domains; a [`DomainId`] indexes this list.
    pub fn domain_names(&self) -> Vec<String> {
        match self.corpus {
            Corpus::Synthetic => SYNTHETIC_DOMAINS.iter().map(|s| s.to_string()).collect(),
            Corpus::Text { .. } => vec!["text".to_string()],
        }
    }

    /// Total tokens of a text corpus; `None` for the endless synthetic stream.
    pub fn num_tokens(&self) -> Option<usize> {
        match &self.corpus {
            Corpus::Synthetic => None,
            Corpus::Text { tokens } => Some(tokens.len()),
        }
    }

    /// Number of windows of `seq_len + 1` tokens in `split`; `None` when endless.
    pub fn num_sequences(&self, split: Split, seq_len: usize) -> Result<Option<u64>> {
        check_seq_len(seq_len)?;
        match &self.corpus {
            Corpus::Synthetic => Ok(None),
            Corpus::Text { tokens } => {
                let (train, heldout) = self.text_windows(tokens.len(), seq_len)?;
                Ok(Some(match split {
                    Split::Train => train,
                    Split::Heldout => heldout,
                }))
            }
        }
    }

    /// (train windows, held-out windows) of a text corpus, or `DataTooShort`.
    fn text_windows(&self, n_tokens: usize, seq_len: usize) -> Result<(u64, u64)> {
        // Windows start at w·T and need T+1 tokens: w·T + T + 1 ≤ n.
        let windows = if n_tokens > seq_len {
            (n_tokens - 1) / seq_len
        } else {
            0
        } as u64;
        if windows < 2 {
            return Err(Error::DataTooShort {
                source_name: self.name.clone(),
                tokens: n_tokens,
                seq_len,
                needed: 2 * seq_len + 1,
            });
        }
        let heldout = ((windows as f64 * HELDOUT_FRACTION).round() as u64).clamp(1, windows - 1);
        Ok((windows - heldout, heldout))
    }

    /// Sequence `index` of `split` in *storage* order (the [`Batcher`] applies the
    /// shuffled reading order on top). For the synthetic train split, `key` selects
    /// the sequence and `index` is ignored; for text, `key` is ignored.
    fn sequence(&self, split: Split, index: u64, key: u64, seq_len: usize) -> Result<Sequence> {
        match &self.corpus {
            Corpus::Synthetic => {
                let key = match split {
                    Split::Train => key,
                    Split::Heldout => mix(HELDOUT_TAG, index),
                };
                self.synthetic_sequence(key, seq_len)
            }
            Corpus::Text { tokens } => {
                let (train, _) = self.text_windows(tokens.len(), seq_len)?;
                let window = match split {
                    Split::Train => index,
                    Split::Heldout => train + index,
                };
                let start = window as usize * seq_len;
                Ok(Sequence {
                    tokens: tokens[start..start + seq_len + 1].to_vec(),
                    domain: DomainId(0),
                })
            }
        }
    }

    fn synthetic_sequence(&self, key: u64, seq_len: usize) -> Result<Sequence> {
        let mut rng = SplitMix64::new(key);
        let domain = rng.below(SYNTHETIC_DOMAINS.len());
        let mut tokens = Vec::with_capacity(seq_len + 16);
        let mut sample = String::new();
        while tokens.len() < seq_len + 1 {
            sample.clear();
            push_sample(domain, &mut rng, &mut sample);
            tokens.extend(self.tokenizer.encode(&sample)?);
        }
        tokens.truncate(seq_len + 1);
        Ok(Sequence {
            tokens,
            domain: DomainId(domain as u16),
        })
    }
}

fn check_seq_len(seq_len: usize) -> Result<()> {
    if seq_len == 0 {
        return Err(Error::DataConfig {
            field: "seq_len",
            value: "0".to_string(),
            rule: "must be at least 1",
        });
    }
    Ok(())
}

/// Regular files at or below `path`, sorted by path; hidden names (".x") skipped;
/// symlinked directories are not followed (they could form cycles).
fn list_text_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::DataPathMissing {
                path: path.to_path_buf(),
            }
        } else {
            Error::DataUnreadable {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::DataEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let unreadable = |source| Error::DataUnreadable {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|source| Error::DataUnreadable {
            path: path.clone(),
            source,
        })?;
        if kind.is_dir() {
            walk(&path, files)?;
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            files.push(path);
        }
    }
    Ok(())
}

/// Batch geometry and order seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchConfig {
    /// `B`: sequences per batch (the global batch; split rows per rank with
    /// [`Batch::rows`]).
    pub batch_size: usize,
    /// `T`: tokens per sequence.
    pub seq_len: usize,
    /// Seed of the reading order (and of the synthetic text).
    pub seed: u64,
}

/// `B` sequences as model inputs and next-token targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `B`.
    pub batch_size: usize,
    /// `T`.
    pub seq_len: usize,
    /// (B, T) row-major token ids.
    pub inputs: Vec<i32>,
    /// (B, T) row-major: `targets[b][t] = inputs[b][t + 1]` within the sequence.
    pub targets: Vec<i32>,
    /// (B,) domain of each sequence.
    pub domains: Vec<DomainId>,
}

impl Batch {
    /// Tokens in the batch, `N = B·T`.
    pub fn num_tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }

    /// (N,) domain of each input token (sequence domain repeated `T` times).
    pub fn token_domains(&self) -> Vec<DomainId> {
        self.domains
            .iter()
            .flat_map(|&d| std::iter::repeat_n(d, self.seq_len))
            .collect()
    }

    /// Rows `range` of the batch, e.g. one data-parallel rank's share.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Result<Batch> {
        if range.start > range.end || range.end > self.batch_size {
            return Err(Error::DataConfig {
                field: "rows",
                value: format!("{range:?}"),
                rule: "must lie within 0..batch_size",
            });
        }
        let t = self.seq_len;
        Ok(Batch {
            batch_size: range.len(),
            seq_len: t,
            inputs: self.inputs[range.start * t..range.end * t].to_vec(),
            targets: self.targets[range.start * t..range.end * t].to_vec(),
            domains: self.domains[range].to_vec(),
        })
    }

    fn from_sequences(seqs: &[Sequence], seq_len: usize) -> Batch {
        let mut inputs = Vec::with_capacity(seqs.len() * seq_len);
        let mut targets = Vec::with_capacity(seqs.len() * seq_len);
        for s in seqs {
            // Token ids are < V ≤ 2^31 for every supported tokenizer, so the cast is exact.
            inputs.extend(s.tokens[..seq_len].iter().map(|&t| t as i32));
            targets.extend(s.tokens[1..=seq_len].iter().map(|&t| t as i32));
        }
        Batch {
            batch_size: seqs.len(),
            seq_len,
            inputs,
            targets,
            domains: seqs.iter().map(|s| s.domain).collect(),
        }
    }
}

/// Where a [`Batcher`] stands; saved in a checkpoint's `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// [`DataSource::name`] of the source.
    pub source: String,
    /// [`DataSource::fingerprint`] of the source.
    pub fingerprint: u64,
    /// The order seed.
    pub seed: u64,
    /// `T` the windows were cut with.
    pub seq_len: usize,
    /// Training sequences consumed so far.
    pub sequences_consumed: u64,
}

/// Reads training batches in a deterministic order from `(seed, position)`.
#[derive(Debug)]
pub struct Batcher {
    source: Arc<DataSource>,
    config: BatchConfig,
    /// Training windows of a text source; `None` for synthetic.
    train_windows: Option<u64>,
    consumed: u64,
    /// (epoch, permutation of window indices) for text sources.
    permutation: Option<(u64, Vec<u64>)>,
}

impl Batcher {
    /// A batcher at position 0. Fails if `B` or `T` is 0 or the corpus is too short.
    pub fn new(source: Arc<DataSource>, config: BatchConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::DataConfig {
                field: "batch_size",
                value: "0".to_string(),
                rule: "must be at least 1",
            });
        }
        let train_windows = source.num_sequences(Split::Train, config.seq_len)?;
        Ok(Batcher {
            source,
            config,
            train_windows,
            consumed: 0,
            permutation: None,
        })
    }

    /// The batch geometry.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// The source read from.
    pub fn source(&self) -> &Arc<DataSource> {
        &self.source
    }

    /// The current position, to store in a checkpoint.
    pub fn position(&self) -> DataPosition {
        DataPosition {
            source: self.source.name().to_string(),
            fingerprint: self.source.fingerprint(),
            seed: self.config.seed,
            seq_len: self.config.seq_len,
            sequences_consumed: self.consumed,
        }
    }

    /// Moves to a saved position. The position must come from the same corpus
    /// (fingerprint), seed and `T`; otherwise the batches would silently differ.
    pub fn seek(&mut self, position: &DataPosition) -> Result<()> {
        if position.fingerprint != self.source.fingerprint() {
            return Err(Error::DataPositionMismatch {
                saved: position.source.clone(),
                saved_fingerprint: position.fingerprint,
                current: self.source.name().to_string(),
                current_fingerprint: self.source.fingerprint(),
            });
        }
        if position.seed != self.config.seed {
            return Err(Error::DataConfig {
                field: "seed",
                value: self.config.seed.to_string(),
                rule: "must equal the seed the saved data position was read with",
            });
        }
        if position.seq_len != self.config.seq_len {
            return Err(Error::DataConfig {
                field: "seq_len",
                value: self.config.seq_len.to_string(),
                rule: "must equal the seq_len the saved data position was read with",
            });
        }
        self.consumed = position.sequences_consumed;
        Ok(())
    }

    /// Completed passes over a text corpus (0 for synthetic).
    pub fn epoch(&self) -> u64 {
        self.train_windows.map_or(0, |w| self.consumed / w)
    }

    /// The next `B` training sequences; advances the position by `B`.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let mut seqs = Vec::with_capacity(self.config.batch_size);
        for _ in 0..self.config.batch_size {
            let p = self.consumed;
            let seq = match self.train_windows {
                None => {
                    let key = mix(mix(self.config.seed, TRAIN_TAG), p);
                    self.source
                        .sequence(Split::Train, p, key, self.config.seq_len)?
                }
                Some(windows) => {
                    let window = self.window_at(p, windows);
                    self.source
                        .sequence(Split::Train, window, 0, self.config.seq_len)?
                }
            };
            seqs.push(seq);
            self.consumed += 1;
        }
        Ok(Batch::from_sequences(&seqs, self.config.seq_len))
    }

    /// Window index read at position `p`: a Fisher–Yates permutation of the training
    /// windows per epoch, keyed by `(seed, epoch)`.
    fn window_at(&mut self, p: u64, windows: u64) -> u64 {
        let epoch = p / windows;
        let stale = self.permutation.as_ref().is_none_or(|(e, _)| *e != epoch);
        if stale {
            let mut perm: Vec<u64> = (0..windows).collect();
            let mut rng = SplitMix64::new(mix(self.config.seed, epoch));
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.below(i + 1));
            }
            self.permutation = Some((epoch, perm));
        }
        let (_, perm) = self
            .permutation
            .as_ref()
            .expect("permutation was set just above");
        perm[(p % windows) as usize]
    }
}

/// The first `n_batches` held-out batches of `B × T` (the same for every seed and
/// every call). A text source with fewer held-out windows than `n_batches · B`
/// wraps around and repeats windows.
pub fn heldout_batches(
    source: &DataSource,
    batch_size: usize,
    seq_len: usize,
    n_batches: usize,
) -> Result<Vec<Batch>> {
    if batch_size == 0 {
        return Err(Error::DataConfig {
            field: "eval_batch_size",
            value: "0".to_string(),
            rule: "must be at least 1",
        });
    }
    let available = source.num_sequences(Split::Heldout, seq_len)?;
    let mut batches = Vec::with_capacity(n_batches);
    for b in 0..n_batches {
        let seqs = (0..batch_size)
            .map(|r| {
                let i = (b * batch_size + r) as u64;
                let i = available.map_or(i, |n| i % n);
                source.sequence(Split::Heldout, i, 0, seq_len)
            })
            .collect::<Result<Vec<_>>>()?;
        batches.push(Batch::from_sequences(&seqs, seq_len));
    }
    Ok(batches)
}
