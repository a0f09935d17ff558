//! Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism",
//! arXiv 2401.10241): the backward is split into I (input gradient, on the
//! critical path) and W (weight gradient, placed freely to fill bubbles).
//!
//! * ZB-H1: one stage per rank; rank r defers its first r W's, so it holds at
//!   most P microbatches in flight (1F1B's peak) and the cooldown bubbles are
//!   filled with W: bubble (P−1)(F+I−W).
//! * ZB-V: two stages per rank on the V map (rank r: stages r and 2P−1−r).
//!   The warmup fills the V, the steady phase runs F I W for both chunks, the
//!   cooldown defers W's; with F = I = W the pipe has no bubble in the steady
//!   phase. For M < 2P−1 the schedule for 2P−1 microbatches is generated and
//!   the ops of the missing microbatches are dropped (a subsequence of a
//!   valid program is valid).

use super::{act, check_min_microbatches, check_ranks};
use crate::error::Result;
use crate::ir::{Action, Op, OpKind};
use crate::maps::{Chain, StageMap};
use crate::schedule::Schedule;
use megamoe_plan::ScheduleKind;

/// Rank `rank`'s ZB-H1 program on stage `rank`. Needs `microbatches >= ranks`.
pub fn zb_h1_rank(rank: usize, ranks: usize, microbatches: usize) -> Result<Vec<Option<Action>>> {
    check_ranks(ranks)?;
    check_min_microbatches(ScheduleKind::ZbH1, microbatches, ranks, "m >= pp")?;
    let s = rank;
    let mut ops = Vec::with_capacity(3 * microbatches);
    let (mut f, mut i, mut w) = (0, 0, 0);
    let mut push = |kind: OpKind, n: &mut usize| {
        ops.push(act(s, kind, *n));
        *n += 1;
    };
    // Phase 1: F — warmup, as in 1F1B.
    let n_warmup = ranks - rank - 1;
    for _ in 0..n_warmup {
        push(OpKind::F, &mut f);
    }
    // Phase 2: F I — the first r W's are deferred (peak in flight stays P).
    let n_deferring = rank;
    for _ in 0..n_deferring {
        push(OpKind::F, &mut f);
        push(OpKind::I, &mut i);
    }
    // Phase 3: F I W — steady state.
    let n_steady = microbatches + 1 - ranks;
    for _ in 0..n_steady {
        push(OpKind::F, &mut f);
        push(OpKind::I, &mut i);
        push(OpKind::W, &mut w);
    }
    // Phase 4: I W — cooldown; W fills the wait for the next I.
    let n_cooldown = ranks - rank - 1;
    for _ in 0..n_cooldown {
        push(OpKind::I, &mut i);
        push(OpKind::W, &mut w);
    }
    // Phase 5: W — the deferred W's.
    let n_drain = rank;
    for _ in 0..n_drain {
        push(OpKind::W, &mut w);
    }
    Ok(ops)
}

/// ZB-H1 on `ranks` ranks, one stage each.
pub fn zb_h1(ranks: usize, microbatches: usize) -> Result<Schedule> {
    check_ranks(ranks)?;
    let programs = (0..ranks)
        .map(|r| zb_h1_rank(r, ranks, microbatches))
        .collect::<Result<Vec<_>>>()?;
    Ok(Schedule {
        kind: Some(ScheduleKind::ZbH1),
        stage_map: StageMap::looped(ranks, 1),
        chains: vec![Chain::linear(ranks, microbatches)],
        programs,
    })
}

/// Per-chunk microbatch counters of one ZB-V rank.
struct Chunks {
    stage: [usize; 2],
    next: [[usize; 2]; 3],
    ops: Vec<Option<Action>>,
}

impl Chunks {
    fn emit(&mut self, kind: OpKind, chunk: usize) {
        let slot = match kind {
            OpKind::F => 0,
            OpKind::I => 1,
            _ => 2,
        };
        let mb = self.next[slot][chunk];
        self.next[slot][chunk] += 1;
        self.ops.push(act(self.stage[chunk], kind, mb));
    }
}

/// Rank `rank`'s ZB-V program on stages `rank` (chunk 0) and `2P−1−rank` (chunk 1).
pub fn zbv_rank(rank: usize, ranks: usize, microbatches: usize) -> Result<Vec<Option<Action>>> {
    check_ranks(ranks)?;
    check_min_microbatches(ScheduleKind::Zbv, microbatches, 1, "m >= 1")?;
    let (p, r) = (ranks, rank);
    // Generate for at least 2P−1 microbatches so every phase count is >= 0.
    let n = microbatches.max(2 * p - 1);
    let mut c = Chunks {
        stage: [r, 2 * p - 1 - r],
        next: [[0; 2]; 3],
        ops: Vec::new(),
    };
    use OpKind::{F, I, W};
    // Phase 1: F0 — fill the down leg of the V.
    let n_fill = 2 * (p - r) - 1;
    for _ in 0..n_fill {
        c.emit(F, 0);
    }
    // Phase 2: F1 F0 — the up leg starts.
    let n_both = r;
    for _ in 0..n_both {
        c.emit(F, 1);
        c.emit(F, 0);
    }
    // Phase 3: F1 I1 W1 — first backwards of the up leg.
    let n_up = p - r;
    for _ in 0..n_up {
        c.emit(F, 1);
        c.emit(I, 1);
        c.emit(W, 1);
    }
    // Phase 4: F0 I0 W0 F1 I1 W1 — steady state while forwards remain.
    let n_steady = n + r + 1 - 2 * p;
    for _ in 0..n_steady {
        for (kind, chunk) in [(F, 0), (I, 0), (W, 0), (F, 1), (I, 1), (W, 1)] {
            c.emit(kind, chunk);
        }
    }
    // Phase 5: I0 W0 F1 I1 W1 — chunk 0 has run all its forwards.
    let n_tail = p - r - 1;
    for _ in 0..n_tail {
        for (kind, chunk) in [(I, 0), (W, 0), (F, 1), (I, 1), (W, 1)] {
            c.emit(kind, chunk);
        }
    }
    // Phase 6: I0 I1 — cooldown, W's deferred.
    let n_cool = r;
    for _ in 0..n_cool {
        c.emit(I, 0);
        c.emit(I, 1);
    }
    // Phase 7: I0 W0 — last input gradients of chunk 0.
    let n_last = p - r;
    for _ in 0..n_last {
        c.emit(I, 0);
        c.emit(W, 0);
    }
    // Phase 8: W1 then W0 — drain the deferred W's.
    let n_drain = r;
    for _ in 0..n_drain {
        c.emit(W, 1);
    }
    for _ in 0..n_drain {
        c.emit(W, 0);
    }
    debug_assert!(
        c.next.iter().all(|k| k[0] == n && k[1] == n),
        "zbv counts must close"
    );
    // Drop the padding microbatches (>= M).
    let keep = |a: &Option<Action>| matches!(a, Some(Action::Op(Op { microbatch: Some(mb), .. })) if *mb < microbatches);
    Ok(c.ops.into_iter().filter(keep).collect())
}

/// ZB-V on `ranks` ranks, 2P stages on the V map.
pub fn zbv(ranks: usize, microbatches: usize) -> Result<Schedule> {
    check_ranks(ranks)?;
    let programs = (0..ranks)
        .map(|r| zbv_rank(r, ranks, microbatches))
        .collect::<Result<Vec<_>>>()?;
    Ok(Schedule {
        kind: Some(ScheduleKind::Zbv),
        stage_map: StageMap::v_shape(ranks),
        chains: vec![Chain::linear(2 * ranks, microbatches)],
        programs,
    })
}
