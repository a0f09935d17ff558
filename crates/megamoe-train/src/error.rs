//! The one error type of `megamoe-train`.
//!
//! Every variant names the file (or field), the offending value and the rule,
//! so the CLI can print it as one sentence and exit with code 2.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in data loading, checkpoints, metrics and reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- generic file system ----
    /// An I/O operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read", "create", "rename", "fsync", ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A tensor operation failed (converting checkpoint tensors).
    #[error(transparent)]
    Tensor(#[from] megamoe_tensor::Error),

    // ---- data and tokenizer ----
    /// `--data PATH` does not exist.
    #[error("data path {path} does not exist")]
    DataPathMissing {
        /// The path given.
        path: PathBuf,
    },
    /// A data file or directory exists but cannot be read.
    #[error("data path {path} cannot be read: {source}")]
    DataUnreadable {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A data file is not valid UTF-8 text.
    #[error("data file {path} is not UTF-8 text (invalid byte at offset {offset})")]
    DataNotText {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// The data path holds no text at all (no files, or only empty files).
    #[error("data path {path} holds no text (no non-empty files found)")]
    DataEmpty {
        /// The file or directory.
        path: PathBuf,
    },
    /// The corpus is too short to give one training and one held-out sequence.
    #[error(
        "data {source_name} has {tokens} tokens; seq_len={seq_len} needs at least {needed} \
         (one training and one held-out window of seq_len+1 tokens)"
    )]
    DataTooShort {
        /// Name of the source (the path, or "synthetic").
        source_name: String,
        /// Tokens in the corpus.
        tokens: usize,
        /// Sequence length asked for.
        seq_len: usize,
        /// Minimum number of tokens needed.
        needed: usize,
    },
    /// A batch or data parameter is out of range.
    #[error("data.{field}={value} is invalid: {rule}")]
    DataConfig {
        /// The field name.
        field: &'static str,
        /// The value given, formatted.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A saved data position does not belong to this data source.
    #[error(
        "data position was saved for source {saved} (fingerprint {saved_fingerprint:016x}) \
         but the run now reads {current} (fingerprint {current_fingerprint:016x})"
    )]
    DataPositionMismatch {
        /// Source name in the saved position.
        saved: String,
        /// Fingerprint in the saved position.
        saved_fingerprint: u64,
        /// Source name of the current data.
        current: String,
        /// Fingerprint of the current data.
        current_fingerprint: u64,
    },
    /// A token id is outside the tokenizer's vocabulary.
    #[error("token id {id} is outside the {tokenizer} vocabulary of size {vocab_size}")]
    TokenOutOfVocab {
        /// The id.
        id: u32,
        /// Tokenizer name.
        tokenizer: &'static str,
        /// Its vocabulary size.
        vocab_size: usize,
    },
    /// A tokenizer.json could not be loaded or used.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What the tokenizers library reported.
        reason: String,
    },
    /// A tokenizer.json was given but the crate was built without `hf-tokenizers`.
    #[error(
        "tokenizer {path}: this build has no HF tokenizers support \
         (rebuild with feature `hf-tokenizers`, or use the built-in byte tokenizer)"
    )]
    TokenizerFeatureDisabled {
        /// The tokenizer file asked for.
        path: PathBuf,
    },

    // ---- checkpoints ----
    /// No checkpoint exists where one was asked for.
    #[error("no checkpoint at {path}: {reason}")]
    CheckpointMissing {
        /// The path given to `--resume` (run dir, checkpoints dir or checkpoint dir).
        path: PathBuf,
        /// What was looked for.
        reason: String,
    },
    /// A file of a checkpoint is absent.
    #[error("checkpoint {dir}: file {file} is missing")]
    CheckpointFileMissing {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The missing file name.
        file: &'static str,
    },
    /// A checkpoint file has another length than `manifest.json` recorded.
    #[error("checkpoint file {path} is truncated or grown: {actual} bytes, manifest.json records {expected}")]
    CheckpointTruncated {
        /// The file.
        path: PathBuf,
        /// Length recorded at save time.
        expected: u64,
        /// Length found.
        actual: u64,
    },
    /// A checkpoint file's SHA-256 differs from the one recorded at save time.
    #[error(
        "checkpoint file {path} is corrupt: sha256 {}…, manifest.json records {}…",
        short_digest(actual),
        short_digest(expected)
    )]
    CheckpointCorrupt {
        /// The file.
        path: PathBuf,
        /// Digest recorded at save time (hex).
        expected: String,
        /// Digest found (hex).
        actual: String,
    },
    /// A checkpoint file cannot be parsed.
    #[error("checkpoint file {path} is malformed: {reason}")]
    CheckpointMalformed {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// `state.json` has a format version this build cannot read.
    #[error(
        "checkpoint file {path} has format version {found}; this build reads version {supported}"
    )]
    CheckpointVersion {
        /// The state.json path.
        path: PathBuf,
        /// Version found.
        found: u32,
        /// Version this build writes and reads.
        supported: u32,
    },
    /// The checkpoint was written with a config that differs in a key a resume
    /// may not change (see `checkpoint::RESUME_SAFE_KEYS` and `RESUME_LAYOUT_KEYS`).
    #[error(
        "checkpoint {path} was saved with another config: {key} is {saved} in the checkpoint \
         but {current} now (a resume may change only train.steps, the eval, checkpoint \
         and log cadence, and the layout parallel.* keeping dp x ep x microbatches)"
    )]
    CheckpointConfigMismatch {
        /// The state.json path.
        path: PathBuf,
        /// `section.key` of the first difference.
        key: String,
        /// Its value in the checkpoint's config (TOML, or "<absent>").
        saved: String,
        /// Its value now (TOML, or "<absent>").
        current: String,
    },
    /// A tensor has another shape in the checkpoint than the model expects.
    #[error("checkpoint file {path}: tensor {tensor} expected shape {expected:?}, got {found:?}")]
    CheckpointShapeMismatch {
        /// The safetensors file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor the model expects is not in the checkpoint.
    #[error("checkpoint file {path}: tensor {tensor} is missing")]
    CheckpointTensorMissing {
        /// The safetensors file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
    },
    /// The checkpoint holds a tensor the model does not have.
    #[error("checkpoint file {path}: tensor {tensor} is not part of the model")]
    CheckpointTensorUnexpected {
        /// The safetensors file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
    },
    /// A tensor handed to `save_checkpoint` is inconsistent (bad name, data length).
    #[error("cannot save tensor {tensor}: {rule}")]
    CheckpointTensorInvalid {
        /// Tensor name.
        tensor: String,
        /// The rule it breaks.
        rule: String,
    },
    /// Parameters (or optimizer state) hold a NaN or an infinity; such a model is
    /// never written to a checkpoint.
    #[error(
        "step {step}: parameter {tensor}[{index}] = {value} is not finite (the model \
         diverged; try a lower optim.lr); no checkpoint was written"
    )]
    NonFiniteParameters {
        /// The step whose checkpoint was refused.
        step: u64,
        /// The first tensor holding a non-finite value (model tensors first).
        tensor: String,
        /// Flat index of the first non-finite value in it.
        index: usize,
        /// That value.
        value: f32,
    },

    // ---- metrics and reports ----
    /// A metrics JSONL line could not be parsed.
    #[error("{path}:{line}: not a metrics record: {source}")]
    MetricsParse {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be serialised to JSON (non-finite floats are written as null, so
    /// this is a bug).
    #[error("cannot serialise {what}: {source}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A run directory has no step records to report on.
    #[error("{path} has no step records; nothing to report")]
    ReportEmpty {
        /// The metrics file.
        path: PathBuf,
    },
    /// Drawing a plot failed.
    #[error("cannot draw plot {path}: {reason}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The plotting library's message.
        reason: String,
    },

    // ---- the training loop ----
    /// The run config is invalid (a plan rule).
    #[error(transparent)]
    Plan(#[from] megamoe_plan::PlanError),
    /// Building or running the model failed.
    #[error(transparent)]
    Model(#[from] megamoe_model::Error),
    /// The optimizer rejected a step or a state.
    #[error(transparent)]
    Optim(#[from] megamoe_optim::OptimError),
    /// An MoE buffer update failed.
    #[error(transparent)]
    Moe(#[from] megamoe_moe::Error),
    /// A collective of a distributed run failed (a failed or silent peer rank, mismatched
    /// calls).
    #[error(transparent)]
    Comm(#[from] megamoe_comm::CommError),
    /// A fault injected into one rank of a distributed run (`MEGAMOE_RANK_FAULT`).
    #[error("rank {rank}: injected fault before step {step} (MEGAMOE_RANK_FAULT)")]
    InjectedRankFault {
        /// The rank that failed.
        rank: usize,
        /// The step it was about to run.
        step: u64,
    },
    /// The pipeline schedule cannot be built for the plan.
    #[error("pipeline schedule: {0}")]
    PipelineSchedule(#[from] megamoe_pipeline::Error),
    /// The pipeline schedule run failed on a rank (a stage or a transfer).
    #[error("pipeline: {0}")]
    PipelineRun(#[from] megamoe_pipeline::ExecError),
    /// The config asks for something the single-process trainer cannot do.
    #[error("{field}={value} is not supported by the trainer: {rule}")]
    TrainConfig {
        /// The config field.
        field: &'static str,
        /// The value given, formatted.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// The resolved config could not be written as TOML (a bug).
    #[error("cannot serialise the run config as TOML: {reason}")]
    ConfigToml {
        /// The TOML library's message.
        reason: String,
    },
    /// A fresh run was pointed at a directory that already holds a run.
    #[error(
        "run directory {path} already holds a run ({what}); continue it with --resume {path} \
         or choose another --run-dir"
    )]
    RunDirInUse {
        /// The run directory.
        path: PathBuf,
        /// What was found there.
        what: &'static str,
    },
    /// Another process holds the run directory's lock.
    #[error(
        "run directory {path} is in use by another megamoe process ({holder}); wait for it \
         to finish or choose another --run-dir"
    )]
    RunDirLocked {
        /// The run directory.
        path: PathBuf,
        /// "pid N", or what is known about the holder.
        holder: String,
    },
    /// The final evaluation gave a non-finite held-out loss.
    #[error("step {step}: the held-out loss is {loss}; the model diverged")]
    NonFiniteEval {
        /// The step evaluated.
        step: u64,
        /// The loss.
        loss: f64,
    },
    /// The NaN/Inf guard stopped the run: too many consecutive non-finite steps.
    #[error(
        "stopped at step {step}: {streak} consecutive steps had a non-finite loss or gradient \
         norm (train.max_nonfinite_steps={limit})"
    )]
    NonFiniteSteps {
        /// The last step run.
        step: u64,
        /// Consecutive non-finite steps.
        streak: usize,
        /// `train.max_nonfinite_steps`.
        limit: usize,
    },
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// The first 12 hex digits of a digest (enough to tell two apart in one line).
fn short_digest(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}
