//! megamoe-pipeline: pipeline-parallel schedules as data.
//!
//! A schedule is, per rank, an ordered list of actions — forward (F),
//! backward for input (I), backward for weights (W), full backward (B), and
//! overlapped F&B units — on globally numbered stages. This crate
//!
//! * defines that IR ([`ir`]: [`Op`], [`Action`]) with PyTorch's compute-only
//!   text form (`2F0`, `(0F7;7B3)OVERLAP_F_B`), stage → rank maps
//!   ([`StageMap`]: loop and V) and chains ([`Chain`]);
//! * generates GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-V, DualPipe and
//!   DualPipeV as pure functions ([`generate`], [`generators`]);
//! * validates schedules ([`validate`]: per-stage counts, per-microbatch
//!   order, one rank per stage, and a lockstep communication dry run that
//!   inserts SEND/RECV pairs and reports deadlocks by rank and action);
//! * simulates them ([`simulate`]: start/end per action under per-kind
//!   costs, makespan, bubble, peak in-flight activations, parameter copies);
//! * draws them ([`trace`]: Chrome/Perfetto JSON, [`svg`]: a timeline);
//! * runs them ([`executor`]: one rank's program over [`Stage`]s and a
//!   [`Transport`], with shared-gradient sums and measured busy/idle time).
//!
//! It also holds the seed's VPP regime helpers ([`vpp`]) and DualPipe stage
//! contract helpers ([`generators::dualpipe`]).
//!
//! Place in the workspace: depends on `megamoe-plan` (for
//! [`ScheduleKind`](megamoe_plan::ScheduleKind)); used by `megamoe-cli`
//! (`megamoe schedule`); `megamoe-train` adapts model chunks to [`Stage`].
//! It never prints; errors are [`Error`] variants naming the value and rule.
//! Conventions: P ranks, M microbatches, `v` chunks per rank; stage `s`,
//! microbatch `mb`. No features.
//!
//! ```
//! use megamoe_pipeline::{generate, simulate, validate, Costs, PipelineShape};
//! use megamoe_plan::ScheduleKind;
//!
//! let shape = PipelineShape { ranks: 4, microbatches: 8, vpp: 1 };
//! let s = generate(ScheduleKind::OneFOneB, shape).unwrap();
//! validate(&s).unwrap();
//! let sim = simulate(&s, &Costs::constant(1.0, 1.0, 1.0, 2.0, None, 0.0)).unwrap();
//! // 1F1B bubble per rank = (P−1)(F+B) = 3·3.
//! assert_eq!(sim.ranks[0].bubble, 9.0);
//! assert_eq!(sim.ranks[0].peak_activations, 4);
//! ```
#![deny(missing_docs)]

pub mod comm_pass;
pub mod error;
pub mod executor;
pub mod generators;
pub mod ir;
pub mod maps;
pub mod p2p;
pub mod schedule;
pub mod simulate;
pub mod svg;
pub mod trace;
pub mod validate;
pub mod vpp;

pub use comm_pass::{insert_send_recv, CommSchedule};
pub use error::{Error, Result, StuckRank};
pub use executor::{
    run_rank, shared_groups, sum_shared_gradients, ExecError, SharedGroup, Stage, Transport,
};
pub use generators::{generate, PipelineShape};
pub use ir::{parse_compute_only, print_compute_only, Action, Op, OpKind};
pub use maps::{parse_stage_map, Chain, StageMap};
pub use p2p::{boundary_shape, check_message_order, Message, Payload};
pub use schedule::Schedule;
pub use simulate::{simulate, Costs, KindCosts, RankReport, Simulation, TimedAction};
pub use svg::timeline_svg;
pub use trace::chrome_trace;
pub use validate::{stage_counts, validate, StageCounts};
