//! megamoe-model: a decoder-only MoE transformer with explicit forward and split backward.
#![deny(missing_docs)]

pub mod attention;
pub mod embedding;
pub mod error;
pub mod flexi_depth;
pub mod gate_skip;
pub mod init;
pub mod mlp;
pub mod norm;

#[cfg(test)]
mod grad_check;

pub use error::{Error, Result};
