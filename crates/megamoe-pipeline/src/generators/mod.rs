//! Schedule generators: pure functions `(rank, ranks, microbatches) → actions`.
//!
//! Each generator checks its preconditions first (named errors), then emits
//! numbered phases, each a loop whose trip count is a named `n_<phase>`
//! computed from the rank and the sizes, under a comment naming its op
//! pattern — the loop bounds are the documentation (as in DualPipe's `step`).

pub mod dualpipe;
pub mod gpipe;
pub mod interleaved;
pub mod one_f_one_b;
pub mod zero_bubble;

use crate::error::{Error, Result};
use crate::ir::{Action, Op, OpKind};
use crate::schedule::Schedule;
use megamoe_plan::ScheduleKind;
use serde::{Deserialize, Serialize};

/// The sizes a schedule is generated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineShape {
    /// Pipeline ranks P.
    pub ranks: usize,
    /// Microbatches M per step (over both directions for DualPipe).
    pub microbatches: usize,
    /// Model chunks per rank for interleaved 1F1B (ignored by other kinds).
    pub vpp: usize,
}

/// Generates the schedule `kind` for `shape`.
pub fn generate(kind: ScheduleKind, shape: PipelineShape) -> Result<Schedule> {
    let PipelineShape {
        ranks,
        microbatches,
        vpp,
    } = shape;
    match kind {
        ScheduleKind::GPipe => gpipe::gpipe(ranks, microbatches),
        ScheduleKind::OneFOneB => one_f_one_b::one_f_one_b(ranks, microbatches),
        ScheduleKind::Interleaved => interleaved::interleaved(ranks, microbatches, vpp),
        ScheduleKind::ZbH1 => zero_bubble::zb_h1(ranks, microbatches),
        ScheduleKind::Zbv => zero_bubble::zbv(ranks, microbatches),
        ScheduleKind::DualPipe => dualpipe::dualpipe(ranks, microbatches),
        ScheduleKind::DualPipeV => dualpipe::dualpipev(ranks, microbatches),
    }
}

/// Shared precondition: at least one rank.
pub(crate) fn check_ranks(ranks: usize) -> Result<()> {
    if ranks == 0 {
        return Err(Error::NoRanks { pp: ranks });
    }
    Ok(())
}

/// Shared precondition: `microbatches >= min`.
pub(crate) fn check_min_microbatches(
    kind: ScheduleKind,
    microbatches: usize,
    min: usize,
    rule: &'static str,
) -> Result<()> {
    if microbatches < min {
        return Err(Error::TooFewMicrobatches {
            kind,
            microbatches,
            min,
            rule,
        });
    }
    Ok(())
}

/// A compute op as an action.
pub(crate) fn act(stage: usize, kind: OpKind, microbatch: usize) -> Option<Action> {
    Some(Action::Op(Op::new(stage, kind, microbatch)))
}
