//! megamoe-model: a decoder-only MoE transformer with explicit forward and split backward.
#![deny(missing_docs)]

pub mod attention;
pub mod block;
pub mod config;
pub mod embedding;
pub mod error;
pub mod ffn;
pub mod flexi_depth;
pub mod gate_skip;
pub mod init;
pub mod mlp;
pub mod model;
pub mod mtp;
pub mod norm;

#[cfg(test)]
mod grad_check;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use model::{
    LossParts, LossValues, Model, ModelForward, ModelParams, ModelSaved, ModelStats, Sampling,
    StatsValues,
};
