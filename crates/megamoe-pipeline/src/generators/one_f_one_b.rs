//! 1F1B (PipeDream-flush): warmup forwards, steady one-forward-one-backward,
//! cooldown backwards. Rank r keeps at most P − r microbatches in flight.

use super::{act, check_min_microbatches, check_ranks};
use crate::error::Result;
use crate::ir::{Action, OpKind};
use crate::maps::{Chain, StageMap};
use crate::schedule::Schedule;
use megamoe_plan::ScheduleKind;

/// Rank `rank`'s 1F1B program on stage `rank`. Needs `microbatches >= ranks`.
pub fn one_f_one_b_rank(
    rank: usize,
    ranks: usize,
    microbatches: usize,
) -> Result<Vec<Option<Action>>> {
    check_ranks(ranks)?;
    check_min_microbatches(ScheduleKind::OneFOneB, microbatches, ranks, "m >= pp")?;
    let s = rank;
    let mut ops = Vec::with_capacity(2 * microbatches);
    let (mut next_f, mut next_b) = (0, 0);
    // Phase 1: F — warmup fills the pipe below this rank.
    let n_warmup = ranks - rank - 1;
    for _ in 0..n_warmup {
        ops.push(act(s, OpKind::F, next_f));
        next_f += 1;
    }
    // Phase 2: F B — steady state.
    let n_steady = microbatches - n_warmup;
    for _ in 0..n_steady {
        ops.push(act(s, OpKind::F, next_f));
        next_f += 1;
        ops.push(act(s, OpKind::B, next_b));
        next_b += 1;
    }
    // Phase 3: B — cooldown drains the warmup microbatches.
    let n_cooldown = n_warmup;
    for _ in 0..n_cooldown {
        ops.push(act(s, OpKind::B, next_b));
        next_b += 1;
    }
    Ok(ops)
}

/// 1F1B on `ranks` ranks, one stage each.
pub fn one_f_one_b(ranks: usize, microbatches: usize) -> Result<Schedule> {
    check_ranks(ranks)?;
    let programs = (0..ranks)
        .map(|r| one_f_one_b_rank(r, ranks, microbatches))
        .collect::<Result<Vec<_>>>()?;
    Ok(Schedule {
        kind: Some(ScheduleKind::OneFOneB),
        stage_map: StageMap::looped(ranks, 1),
        chains: vec![Chain::linear(ranks, microbatches)],
        programs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::print_compute_only;

    #[test]
    fn one_f_one_b_two_ranks_matches_hand_drawn_diagram() {
        // rank 0: warmup 1 F, then F B, then B.   rank 1: F B F B F B.
        let s = one_f_one_b(2, 3).unwrap();
        assert_eq!(
            print_compute_only(&s.programs),
            "0F0,0F1,0B0,0F2,0B1,0B2\n1F0,1B0,1F1,1B1,1F2,1B2\n"
        );
    }

    #[test]
    fn one_f_one_b_with_fewer_microbatches_than_ranks_is_rejected() {
        let e = one_f_one_b(4, 3).unwrap_err();
        assert!(e.to_string().contains("microbatches=3 must be >= 4"), "{e}");
    }
}
