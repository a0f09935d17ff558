//! megamoe-plan: the run config, its validation, and device-free planning math.
//!
//! # Job
//! Turn a TOML run config (plus `--set` overrides) into a validated [`Plan`]
//! before any device is touched: every bad setting is one [`PlanError`] that
//! names the field, the value and the rule. The same crate holds the planning
//! formulas other crates reuse: expert capacity ([`expert_capacity`]),
//! null-slot pools ([`null_slot_plan`]), group routing, TP head partition,
//! FSDP shard math ([`shard`]) and the per-rank memory model ([`memory`]).
//!
//! # Principal types
//! [`RawConfig`] (serde, one struct per TOML section, strings only for enums'
//! names) → [`Plan::resolve`] → [`Plan`] (enums, derived numbers, [`Mesh`],
//! [`PipelineLayout`] with its [`StageMap`], warnings as data). Layers receive their slice of the plan.
//!
//! # Place in the workspace
//! The leaf: depends on no megamoe crate; every other crate may depend on it.
//! Never prints (the CLI does).
//!
//! # Key decision: the mesh
//! world = pp·dp·ep·cp·tp, rank order (pp, dp, ep, cp, tp) with tp fastest;
//! see [`Mesh`]. `parallel.fsdp` is the ZeRO level (0-3) over each
//! parameter's data-parallel group ([`ZeroLevel`]).
//!
//! ```
//! use megamoe_plan::{Plan, RawConfig, TINY_CONFIG};
//! let raw = RawConfig::from_toml_str(TINY_CONFIG).unwrap();
//! let plan = Plan::resolve(&raw, Some(1)).unwrap();
//! let moe = plan.moe.as_ref().unwrap();
//! assert_eq!(moe.experts_per_ep_rank, moe.routed_experts / plan.parallel.ep);
//! assert!(plan.mesh.world() == 1);
//! ```

#![deny(missing_docs)]

pub mod activation_store;
pub mod bounds;
pub mod capacity;
mod error;
mod features;
pub mod group_routing;
pub mod keys;
pub mod memory;
mod mesh;
mod modes;
mod moe_plan;
pub mod null_slot;
pub mod params;
mod plan;
mod raw;
mod schedule_kind;
pub mod seed_memory;
pub mod shard;
mod stages;
pub mod tp;
pub mod triage;

pub use activation_store::AttentionKernel;
pub use bounds::{MemoryLimit, MAX_WORLD};
pub use capacity::{
    expert_capacity, expert_parallel_routing_sample, routed_tokens_per_step, RoutingSummary,
};
pub use error::{PlanError, Result};
pub use features::{flexidepth_router_hidden, mtp_step_weights};
pub use group_routing::{group_routing_plan, GroupRoutingPlan};
pub use memory::{
    activation_bytes_per_layer, in_flight_layer_microbatches, plan_memory, plan_memory_with,
    rank_memory, rank_memory_with, zero_model_state_bytes, ActivationShape, PlanMemory, RankMemory,
    StateBytes,
};
pub use mesh::{Mesh, MeshGroup, RankCoords, APPLICATION_ORDER};
pub use modes::{
    Activation, AuxLossKind, Capacity, ConcatOrder, DropPolicy, GateKind, LrSchedule, MomentDtype,
    MtpMode, MuonScale, OffloadTarget, OffloadTargets, OptimizerKind, Precision, Recompute,
    RouterOrder, ScoreFn, SkipPenalty, ZeroLevel,
};
pub use null_slot::{null_slot_plan, NullSlotPlan};
pub use params::{layer_params, model_params, rank_params, ParamCount};
pub use plan::{
    BatchPlan, FlexiDepthPlan, GateSkipPlan, ModelPlan, MoePlan, MtpPlan, MuonPlan, OptimPlan,
    ParallelPlan, Plan, PlanWarning, RoutingPlan, SharedExpertsPlan, TrainPlan,
    BF16_MOMENT_MAX_BETA,
};
pub use raw::{
    FlexiDepthSection, GateSkipSection, ModelSection, MoeSection, MtpSection, OptimSection,
    Override, ParallelSection, RawConfig, TrainSection,
};
pub use schedule_kind::{ScheduleKind, UnknownSchedule};
pub use seed_memory::{
    estimate_fsdp_memory, estimate_memory_per_device, estimate_rank_memory, FsdpMemoryInputs,
    PerDeviceMemory, RankMemoryEstimate,
};
pub use shard::{
    chunk, fsdp_shard_table, local_grad_slice, qkv_local_split_sizes, shard0_bounds, MatrixShard,
    RowShard,
};
pub use stages::{rank_stages, stage_count, PipelineLayout, RankStages, StageMap};
pub use tp::{partition_heads, partition_qkv_heads, HeadPartition};
pub use triage::{
    dominant_pressure, estimate_memory_budget, oom_triage, residual_runtime_bytes, MemoryBreakdown,
    MemoryBucket, OomTriage, TriageStep,
};

/// The tiny CPU default config (`configs/tiny.toml`), embedded so `megamoe train`
/// runs with no arguments.
pub const TINY_CONFIG: &str = include_str!("../../../configs/tiny.toml");
