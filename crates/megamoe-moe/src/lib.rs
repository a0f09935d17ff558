//! megamoe-moe: the Mixture-of-Experts layer — router, capacity, dispatch, routed expert
//! bank, shared experts, router losses — with explicit forward and split backward.
//!
//! # Principal types
//! [`MoeConfig`] (validated, built from `megamoe_plan::MoePlan`) → [`MoeLayer`]. A layer
//! call is a pipeline of named stages (Megatron `moe_layer.py`):
//! [`Router`] gating then routing → [`capacity::apply_capacity`] → [`TokenDispatcher`]
//! permute / exchange / expert buffers → [`GroupedExperts`] (reference:
//! [`SequentialExperts`]) → dispatcher combine; plus [`SharedExperts`] and the losses in
//! [`losses`]. Weights live in [`MoeParams`] (PyTorch names via `visit`), forward state in
//! [`MoeSaved`], deferred weight work in [`MoeDeferredW`]; per-call counts in [`MoeStats`].
//!
//! # Place in the workspace
//! Depends on megamoe-tensor (every element touch is a tensor op; routing kernels are the
//! tensor crate's `ops::routing` and `ops::capacity` families), megamoe-plan (config enums,
//! capacity and null-slot math) and megamoe-comm (every `Arc` of a communicator is a
//! [`RowExchange`] for the expert-parallel dispatcher). Used by
//! megamoe-model (MoE FFN blocks) and megamoe-cli (`megamoe probe moe`). Never imports
//! model, optim, pipeline or train.
//!
//! # Conventions and glossary
//! - Shapes: `N` tokens, `H` model width, `E` routed experts, `Ep = E + n_null` router pool
//!   slots, `K` slots per token (`k`, or `k_max` with null slots), `F` routed-expert width,
//!   `Fs` shared width, `R` kept assignments, `C` capacity.
//! - *Routed experts* are the E specialists; *shared experts* the always-on dense path.
//! - A *null slot* is a top-K slot a token spends on no expert ([`Slot::Null`]); a *dropped*
//!   assignment is a real pick over capacity; a *pad row* is filler in a static expert
//!   buffer. Null slots and dropped assignments cost nothing and get zero gradient.
//! - `backward_input` writes `d_x` fresh; `backward_weight` accumulates (+=).
//! - Router math is f32; reductions inside ops accumulate in f64. Results are identical
//!   for any rayon thread count.
//! - Sync rule: the grouped GEMM takes the expert groups as device tensors
//!   (`RowGroups`), so one rank's forward + backward reads nothing on the host. The only
//!   device→host reads are the exchanged counts of a packed expert-parallel dispatch (one per
//!   forward, sizing the all-to-all) and [`MoeStats::to_host`], each marked `// SYNC:`. With
//!   `pad_to_capacity` every shape is static and nothing is read, also across ranks
//!   (tested with the tensor crate's `host_reads` counter).
//! - Ranks: the layer gets its [`TokenDispatcher`] from outside ([`MoeLayer::with_dispatcher`];
//!   [`MoeLayer::new`] uses a [`LocalDispatcher`]). Its expert weights cover the
//!   dispatcher's local experts `[e0, e1)` ([`MoeParams::init_local`] draws exactly those
//!   rows of the global bank); the router and shared experts are replicated.
//!
//! # Example
//! ```
//! use megamoe_moe::{MoeConfig, MoeLayer, MoeParams, RouterLossScale};
//! use megamoe_tensor::{Device, Tensor};
//! # fn main() -> megamoe_moe::Result<()> {
//! let cfg = MoeConfig::from_toml_str(
//!     "[model]\nvocab_size = 256\nd_model = 16\nn_layers = 1\nn_heads = 2\n\
//!      ffn_hidden = 32\nseq_len = 8\n[moe]\nrouted_experts = 4\ntop_k = 2\nexpert_hidden = 8\n",
//! )?;
//! let params = MoeParams::init(&cfg, 7, "model.layers.0.mlp.")?;
//! let layer = MoeLayer::new(cfg)?;
//! let x = Tensor::randn_named(1, "x", [8, 16], 1.0, Device::Cpu)?;
//! let (out, saved) = layer.forward(&params, &x)?;
//! let stats = out.stats.to_host()?;
//! assert_eq!(stats.tokens_per_expert.iter().sum::<usize>(), 8 * 2); // dropless: T·k
//! let mut grads = params.zeros_like()?;
//! let d_x = layer.backward(&params, &out.y, saved, RouterLossScale::zero(), &mut grads)?;
//! assert_eq!(d_x.dims(), &[8, 16]);
//! # Ok(())
//! # }
//! ```
//!
//! Examples: `cargo run -p megamoe-moe --example <name>` for expert_parallel_routing,
//! moe_group_routing, moe_null_slot_routing, shared_expert_gate, moe_loss_collection,
//! fused_expert_bank_probe, moe_dispatch_fast_paths.
#![deny(missing_docs)]

pub mod bias;
pub mod capacity;
pub mod config;
pub mod dispatch;
mod error;
pub mod experts;
pub mod layer;
pub mod losses;
pub mod params;
pub mod probe;
pub mod router;
pub mod shared;
pub mod stats;
pub mod tp;

pub use bias::ExpertBiasUpdate;
pub use config::{MoeConfig, RoutedExpertsConfig, RouterConfig, SharedExpertsConfig};
pub use dispatch::{
    Assignments, DispatchFastPaths, DispatchLayout, ExpertLayout, ExpertParallelDispatcher,
    LocalDispatcher, RowExchange, TokenDispatcher,
};
pub use error::{Error, Result};
pub use experts::{
    compare_expert_banks, ExpertBank, GroupedExperts, RoutedExpertsParams, SequentialExperts,
};
pub use layer::{MoeDeferredW, MoeLayer, MoeOutput, MoeSaved};
pub use losses::{
    collect_router_losses, LayerRouterLosses, RouterLossScale, RouterLossWeights, StepRouterLoss,
};
pub use params::MoeParams;
pub use probe::{check_probe_inputs, probe_input_shapes, run_probe};
pub use router::{ExpertId, Router, RouterParams, Routing, Slot};
pub use shared::{SharedExperts, SharedExpertsParams};
pub use stats::{MoeStats, RoutingStats};
pub use tp::{tp_slice, TensorParallel};
