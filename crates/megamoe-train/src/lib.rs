//! megamoe-train: everything around the training step — data, tokenizer,
//! checkpoints, metrics, goodput accounting, progress display and reports.
//!
//! (Full crate documentation is written once the trainer lands.)
#![deny(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod goodput;
pub mod metrics;
pub mod progress;
pub mod report;
mod rng;
mod sha256;
pub mod synthetic;
#[cfg(test)]
mod test_dir;
pub mod tokenizer;

pub use data::{
    heldout_batches, Batch, BatchConfig, Batcher, DataPosition, DataSource, DataSpec, DomainId,
    Split,
};
pub use error::{Error, Result};
pub use tokenizer::Tokenizer;
