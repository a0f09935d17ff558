//! GPipe: every forward, then every backward (peak activations = M per rank).

use super::{act, check_min_microbatches, check_ranks};
use crate::error::Result;
use crate::ir::{Action, OpKind};
use crate::maps::{Chain, StageMap};
use crate::schedule::Schedule;
use megamoe_plan::ScheduleKind;

/// Rank `rank`'s program: `F0..F(M−1)` then `B0..B(M−1)` on stage `rank`.
pub fn gpipe_rank(rank: usize, ranks: usize, microbatches: usize) -> Result<Vec<Option<Action>>> {
    check_ranks(ranks)?;
    check_min_microbatches(ScheduleKind::GPipe, microbatches, 1, "m >= 1")?;
    let mut ops = Vec::with_capacity(2 * microbatches);
    // Phase 1: F — every microbatch forward.
    let n_forward = microbatches;
    ops.extend((0..n_forward).map(|mb| act(rank, OpKind::F, mb)));
    // Phase 2: B — every microbatch backward, in the same order.
    let n_backward = microbatches;
    ops.extend((0..n_backward).map(|mb| act(rank, OpKind::B, mb)));
    Ok(ops)
}

/// GPipe on `ranks` ranks, one stage each.
pub fn gpipe(ranks: usize, microbatches: usize) -> Result<Schedule> {
    check_ranks(ranks)?;
    let programs = (0..ranks)
        .map(|r| gpipe_rank(r, ranks, microbatches))
        .collect::<Result<Vec<_>>>()?;
    Ok(Schedule {
        kind: Some(ScheduleKind::GPipe),
        stage_map: StageMap::looped(ranks, 1),
        chains: vec![Chain::linear(ranks, microbatches)],
        programs,
    })
}
