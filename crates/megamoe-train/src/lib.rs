//! megamoe-train: everything around the training step — data and tokenizer,
//! crash-safe checkpoints, per-step metrics, goodput accounting, the progress line
//! and the run report.
//!
//! # Principal types
//! - [`DataSource`] (the embedded synthetic corpus or `--data PATH`) and [`Batcher`]:
//!   `(B, T)` inputs/targets plus per-sequence [`DomainId`]s in an order that is a
//!   pure function of `(seed, position)`; the position ([`DataPosition`]) is one
//!   counter, saved in checkpoints, so a resumed run reads bit-identical batches.
//!   [`heldout_batches`] gives the fixed eval set.
//! - [`checkpoint`]: [`save_checkpoint`] / [`load_checkpoint`] of
//!   `model.safetensors` + `optimizer.safetensors` + `state.json` ([`TrainState`]),
//!   published atomically; loads are validated against an [`Expected`] config and
//!   tensor list and fail with typed errors naming the file and mismatch.
//! - [`metrics`]: [`StepMetrics`] / [`EvalMetrics`] records in `metrics.jsonl`
//!   ([`MetricsWriter`], [`read_metrics`]).
//! - [`GoodputTracker`]: wall time booked to step / data / checkpoint / eval / compile.
//! - [`Progress`]: indicatif bar on a terminal, one plain line per step otherwise.
//! - [`render_report`]: SVG plots and `report.txt` from a run directory.
//! - [`distributed`]: training over several ranks — [`distributed::PipelineRank`] runs
//!   one pipeline rank's share of a step under any generated schedule.
//! - [`RunDir`]: the paths of a run directory.
//!
//! A trainer step reads like llm.c's loop: `batcher.next_batch()` (booked to
//! `Data`) → model forward/backward + optimizer (`Step`) → build [`StepMetrics`]
//! → `metrics.write` → `progress.step`; every `eval_every` steps
//! [`heldout_batches`] (`Eval`); every `ckpt_every` steps [`save_checkpoint`]
//! with `batcher.position()` and `goodput.totals()` (`Checkpoint`).
//!
//! # Place in the workspace
//! Depends on every other megamoe crate except `megamoe-cli`; used by
//! `megamoe-cli`. Must never be imported by a lower crate.
//!
//! # Conventions
//! Shape letters: `B` sequences, `T` sequence length, `N = B·T`,
//! `E` routed experts. Token ids are `u32` in the data layer and `i32` in batches
//! (the tensor crate's index dtype). This crate never prints except through
//! [`Progress`]; diagnostics go through `log`.
//!
//! # Features
//! - `hf-tokenizers`: load a Hugging Face `tokenizer.json` with [`Tokenizer::from_file`]
//!   (pulls in the `tokenizers` crate with the Oniguruma regex engine).
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use megamoe_train::{BatchConfig, Batcher, DataSource, Tokenizer};
//! # fn main() -> megamoe_train::Result<()> {
//! let source = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
//! let config = BatchConfig { batch_size: 2, seq_len: 16, seed: 0 };
//! let mut batcher = Batcher::new(source.clone(), config)?;
//! let first = batcher.next_batch()?;
//! assert_eq!(first.inputs.len(), 2 * 16);
//! assert_eq!(first.targets[..15], first.inputs[1..16]); // next-token targets
//!
//! // Resuming from a saved position reads exactly the same next batch.
//! let saved = batcher.position();
//! let second = batcher.next_batch()?;
//! let mut resumed = Batcher::new(source, config)?;
//! resumed.seek(&saved)?;
//! assert_eq!(resumed.next_batch()?, second);
//! # Ok(())
//! # }
//! ```
//!
//! End-to-end use of data + checkpoint + metrics + report with a stand-in model:
//! `crates/megamoe-train/tests/resume.rs`.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod clock;
pub mod data;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod failpoint;
mod flat_optim;
pub mod goodput;
mod gpu_pool;
pub use gpu_pool::{attention_kernel, predicted_peak_bytes};
pub mod metrics;
pub mod peak;
pub mod progress;
pub mod report;
mod rng;
pub mod run_dir;
pub mod run_totals;
pub mod session;
mod sha256;
mod step_graph;
mod step_stats;
pub mod support;
pub mod synthetic;
pub mod tensorboard;
#[cfg(test)]
mod test_dir;
pub mod tokenizer;
pub mod trainer;

pub use checkpoint::{
    load_checkpoint, save_checkpoint, Checkpoint, Expected, NamedTensor, TensorSpec, TrainState,
};
pub use data::{
    heldout_batches, Batch, BatchConfig, Batcher, DataPosition, DataSource, DataSpec, DomainId,
    Split,
};
pub use error::{Error, Result};
pub use goodput::{GoodputTotals, GoodputTracker, TimeCategory};
pub use metrics::{
    read_metrics, EvalMetrics, LossParts, MetricsRecord, MetricsWriter, MoeLayerStats, StepMetrics,
};
pub use progress::Progress;
pub use report::{render_report, ReportSummary};
pub use run_dir::{RunDir, RunLock};
pub use session::{run_training, RunOptions, RunSummary};
pub use tokenizer::Tokenizer;
pub use trainer::{Trainer, TrainerOptions};
