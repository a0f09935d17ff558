//! megamoe-model: a decoder-only MoE transformer with explicit forward and split backward.
//!
//! # Purpose
//! Turns the tensor ops and the MoE layer into a trainable language model: embedding →
//! pre-norm blocks (causal RoPE GQA attention, dense SwiGLU FFN or MoE FFN every
//! `layer_freq` layers) → final RMSNorm → LM head (tied optional) → cross-entropy with
//! ignore index −100, plus the seed's specialist features: GateSkip residual gates with a
//! token budget, FlexiDepth adaptive layer skipping, and MTP (shared block or DeepSeek
//! sequential modules).
//!
//! # Principal types
//! - [`Model`] (stateless: config + layer objects) and [`ModelParams`] (every weight; the
//!   same type holds gradients and optimizer moments). `ModelParams::visit`/`visit_mut`
//!   enumerate HF-style names (`model.embed_tokens.weight`,
//!   `model.layers.{i}.self_attn.q_proj.weight`, `model.layers.{i}.mlp.experts.gate_up_proj`,
//!   `model.norm.weight`, `lm_head.weight`, `mtp.layers.{j}.*`) with their
//!   [`megamoe_optim::ParamRole`].
//! - [`Model::forward`] → [`ModelForward`] { [`LossParts`] (unweighted `lm_loss`,
//!   `mtp_losses`, `aux`, `z`, `gate_skip`, `flexi_depth` and the weighted `total`),
//!   [`ModelStats`], [`ModelSaved`] (the activation store) }.
//! - [`Model::backward`] consumes the [`ModelSaved`] by value and accumulates gradients.
//! - Layers, each `Config`/`Params`/`Saved`/`DeferredW` with `forward`, `backward_input`,
//!   `backward_weight`: [`attention`], [`mlp`], [`ffn`] (dense or MoE), [`norm`],
//!   [`embedding`], [`gate_skip`], [`flexi_depth`], [`block`], [`mtp`].
//! - [`BlockGather`] ([`param_gather`]): the per-layer hook of fully sharded training
//!   (ZeRO-3), giving each block its full parameters just before it runs; [`GradReady`]
//!   ([`grad_ready`]): told when the backward has finished a block's weight gradients
//!   (data-parallel reduce overlapped with the backward).
//!
//! # Place in the workspace
//! Depends on megamoe-tensor, megamoe-moe and megamoe-plan; used by megamoe-train. Never
//! imports the pipeline crate (train adapts blocks to pipeline stages).
//!
//! # Conventions
//! Shapes `[N, H]` with `N = B·T`; weights `[out, in]` (PyTorch). `backward_input` writes
//! activation gradients fresh; `backward_weight` and [`Model::backward`] ACCUMULATE (+=)
//! into parameter gradients; residual sums are explicit adds in `block.rs`. Every loss
//! weight and the step's gradient scale (1/(grad_accum·chunks)) are applied exactly once,
//! inside `backward`. Element values reach the host only in `to_host` calls marked SYNC
//! (loss parts, stats, sampling). Init is layout-invariant (`Tensor::randn_named` keyed
//! by seed and parameter name).
//!
//! # Example
//! ```
//! use megamoe_model::{Model, ModelConfig};
//! use megamoe_plan::Plan;
//! use megamoe_tensor::{Device, Tensor};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let plan = Plan::from_toml_str(
//!     "[model]\nvocab_size = 16\nd_model = 8\nn_layers = 2\nn_heads = 2\nffn_hidden = 16\n\
//!      seq_len = 4\n[train]\nglobal_batch = 2\n[mtp]\ndepth = 2\n",
//!     &[],
//!     Some(1),
//! )?;
//! let model = Model::new(ModelConfig::from_plan(&plan)?)?;
//! let params = model.init_params()?;
//! let ids = Tensor::from_vec_i32(vec![1, 2, 3, 4, 5, 6, 7, 8], [2, 4], Device::Cpu)?;
//! let targets = Tensor::from_vec_i32(vec![2, 3, 4, 5, 6, 7, 8, -100], [2, 4], Device::Cpu)?;
//! let out = model.forward(&params, &ids, &targets, 0)?;
//! let losses = out.losses.to_host()?; // one sync for every loss part
//! assert!((losses.lm_loss - 16f32.ln()).abs() < 0.1); // near-uniform at init
//! assert_eq!(losses.mtp_losses.len(), 2);
//! let mut grads = params.zeros_like()?;
//! model.backward(&params, out.saved, &mut grads, 1.0)?;
//! let mut norm2 = 0.0;
//! grads.visit(&mut |_, g, _| norm2 += g.sum_squares().unwrap().to_scalar_f32().unwrap());
//! assert!(norm2 > 0.0);
//! # Ok(())
//! # }
//! ```
//! Examples: `cargo run -p megamoe-model --example gateskip_residual_budget`
//! (also `flexidepth_skip_router`, `mtp_shared_block`).
#![deny(missing_docs)]

pub mod attention;
pub mod block;
pub mod chunk;
pub mod chunk_params;
pub mod config;
pub mod embedding;
pub mod error;
pub mod ffn;
pub mod flexi_depth;
pub mod gate_skip;
pub mod generate;
pub mod grad_buffers;
pub mod grad_ready;
pub mod init;
pub mod mlp;
pub mod model;
pub mod mtp;
pub mod norm;
mod offload;
pub mod outputs;
pub mod param_gather;
pub mod tp;

#[cfg(test)]
mod grad_check;

pub use chunk::{
    ActivationStore, ChunkCarry, ChunkCarryGrad, ChunkDeferredW, ChunkForward, ChunkSaved,
    ChunkSpec, ModelChunk,
};
pub use chunk_params::{shared_params, ChunkParams, Shared, SharedParam};
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use generate::TokenSampler;
pub use grad_buffers::{Bucket, FlatLayout, GradBuffers, ParamSlot};
pub use grad_ready::GradReady;
pub use model::{
    LossParts, LossValues, Model, ModelForward, ModelParams, ModelSaved, ModelStats, Sampling,
    StatsValues,
};
pub use param_gather::BlockGather;
