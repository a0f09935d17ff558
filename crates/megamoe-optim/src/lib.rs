//! megamoe-optim: the optimizers that step megamoe's parameters.
//!
//! # Purpose
//! AdamW and Muon (NS5 orthogonalised momentum) over named parameters, routed by
//! [`ParamRole`](crate::ParamRole); learning-rate schedules; global grad-norm
//! clipping; FSDP2 dim-0 shard maps and the single-process form of distributed Muon
//! (Moonlight Algorithm 1).
//!
//! # Principal types
//! - [`Optimizer`] (state.rs): owns per-parameter state keyed by name; `new`, `step`,
//!   `visit_state` / `load_state` for checkpoints.
//! - [`Schedule`] (lr_schedule.rs): warmup + cosine / linear / constant.
//! - [`clip_grad_norm`] (clip.rs): returns the pre-clip norm; non-finite norms reported.
//! - [`muon`]: NS5, momentum, keller / moonlight scaling; [`adamw`]: the AdamW update.
//! - [`shard`]: `chunk` / `even` row maps, [`shard::ShardedMuon`] (distributed Muon in one
//!   process) and [`RowGather`], the collective [`Optimizer::step_sharded`] calls to run
//!   Muon on a rank's row shards.
//! - [`NamedParams`]: a flat `(name, tensor, role)` list with `visit` / `visit_mut`.
//!
//! # What the trainer calls each step
//! ```
//! use megamoe_optim::{clip_grad_norm, NamedParams, Optimizer, Schedule};
//! use megamoe_plan::{LrSchedule, MomentDtype, OptimPlan, OptimizerKind};
//! use megamoe_optim::ParamRole;
//! use megamoe_tensor::{Device, Tensor};
//! # fn main() -> megamoe_optim::Result<()> {
//! let plan = OptimPlan {
//!     kind: OptimizerKind::AdamW, lr: 1e-2, min_lr: 1e-3, warmup_steps: 2,
//!     lr_schedule: LrSchedule::Cosine, weight_decay: 0.1, beta1: 0.9, beta2: 0.95,
//!     eps: 1e-8, moment_dtype: MomentDtype::F32, grad_clip: Some(1.0), muon: None,
//! };
//! let mut params = NamedParams::new();
//! params.push("w", Tensor::from_vec_f32(vec![1.0, 2.0], [2], Device::Cpu)?, ParamRole::Scalar);
//! let mut grads = params.map(|t| t.scale(0.5))?;
//! let schedule = Schedule::from_plan(&plan, 10)?;
//! let mut opt = Optimizer::new(&plan, &mut |f| params.visit("", f))?;
//! for step in 0..3 {
//!     let clip = clip_grad_norm(&mut |f| grads.visit_mut("", f), plan.grad_clip)?;
//!     assert!(clip.finite); // else: skip the step
//!     let lr = schedule.lr(step);
//!     opt.step(&mut |f| params.visit_mut("", f), &mut |f| grads.visit("", f), lr)?;
//! }
//! assert_eq!(opt.steps_taken(), 3);
//! # Ok(())
//! # }
//! ```
//!
//! # Place in the workspace
//! Depends on megamoe-tensor (ops, `ParamRole`) and megamoe-plan (`OptimPlan`, shard math).
//! Used by megamoe-train.

pub mod adamw;
pub mod clip;
pub mod error;
pub mod lr_schedule;
pub mod muon;
pub mod param_groups;
pub mod params;
pub mod role;
pub mod shard;
pub mod state;

pub use adamw::{AdamWConfig, AdamWState};
pub use clip::{
    clip_factor, clip_grad_norm, clip_grad_norm_tensor, global_grad_norm, global_grad_norm_tensor,
    ClipReport,
};
pub use error::{OptimError, Result};
pub use lr_schedule::Schedule;
pub use muon::{MuonConfig, NsPrecision};
pub use param_groups::{update_rule, UpdateRule};
pub use params::NamedParams;
pub use role::ParamRole;
pub use shard::RowGather;
pub use state::{Optimizer, ParamState, GATE_UP_SUFFIX, STATE_KINDS};
