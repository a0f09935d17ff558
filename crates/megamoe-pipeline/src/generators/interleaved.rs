//! Interleaved 1F1B (Megatron VPP): `v` chunks per rank on a loop map, stage
//! `c·P + r` on rank `r`.
//!
//! Micro-step `k` of a rank touches chunk `(k mod P·v) / P` going forward
//! (reversed, `v − 1 − …`, going backward) and microbatch
//! `(k / (P·v))·P + k mod P`: groups of P microbatches sweep through the
//! chunks in turn. Warmup counts come from [`crate::vpp`].

use super::{act, check_ranks};
use crate::error::Result;
use crate::ir::{Action, OpKind};
use crate::maps::{Chain, StageMap};
use crate::schedule::Schedule;
use crate::vpp::vpp_warmup_counts;
use megamoe_plan::ScheduleKind;

/// (stage, microbatch) of forward micro-step `k` on `rank`.
fn forward_step(k: usize, rank: usize, ranks: usize, vpp: usize) -> (usize, usize) {
    let group = ranks * vpp;
    let chunk = (k % group) / ranks;
    (chunk * ranks + rank, (k / group) * ranks + k % ranks)
}

/// (stage, microbatch) of backward micro-step `k` on `rank`.
fn backward_step(k: usize, rank: usize, ranks: usize, vpp: usize) -> (usize, usize) {
    let group = ranks * vpp;
    let chunk = vpp - 1 - (k % group) / ranks;
    (chunk * ranks + rank, (k / group) * ranks + k % ranks)
}

/// Rank `rank`'s interleaved program. Needs `vpp >= 2`, `m % P == 0` and no
/// rank in the all-warmup regime.
pub fn interleaved_rank(
    rank: usize,
    ranks: usize,
    microbatches: usize,
    vpp: usize,
) -> Result<Vec<Option<Action>>> {
    check_ranks(ranks)?;
    let counts = vpp_warmup_counts(ranks, vpp, microbatches)?;
    let total = microbatches * vpp;
    let mut ops = Vec::with_capacity(2 * total);
    let f = |k| {
        let (s, mb) = forward_step(k, rank, ranks, vpp);
        act(s, OpKind::F, mb)
    };
    let b = |k| {
        let (s, mb) = backward_step(k, rank, ranks, vpp);
        act(s, OpKind::B, mb)
    };
    // Phase 1: F — warmup, 2(P−r−1) + (v−1)·P forward micro-steps.
    let n_warmup = counts[rank].warmup;
    ops.extend((0..n_warmup).map(f));
    // Phase 2: F B — steady, forward k + warmup then backward k.
    let n_steady = total - n_warmup;
    for k in 0..n_steady {
        ops.push(f(k + n_warmup));
        ops.push(b(k));
    }
    // Phase 3: B — cooldown.
    let n_cooldown = n_warmup;
    ops.extend((0..n_cooldown).map(|j| b(n_steady + j)));
    Ok(ops)
}

/// Interleaved 1F1B on `ranks` ranks with `vpp` chunks each.
pub fn interleaved(ranks: usize, microbatches: usize, vpp: usize) -> Result<Schedule> {
    check_ranks(ranks)?;
    let programs = (0..ranks)
        .map(|r| interleaved_rank(r, ranks, microbatches, vpp))
        .collect::<Result<Vec<_>>>()?;
    Ok(Schedule {
        kind: Some(ScheduleKind::Interleaved),
        stage_map: StageMap::looped(ranks, vpp),
        chains: vec![Chain::linear(ranks * vpp, microbatches)],
        programs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_micro_steps_sweep_chunks_in_groups_of_p() {
        // P = 2, v = 2: forward steps 0..4 → (chunk0,mb0) (chunk0,mb1) (chunk1,mb0) (chunk1,mb1).
        let got: Vec<_> = (0..4).map(|k| forward_step(k, 1, 2, 2)).collect();
        assert_eq!(got, vec![(1, 0), (1, 1), (3, 0), (3, 1)]);
        let back: Vec<_> = (0..4).map(|k| backward_step(k, 1, 2, 2)).collect();
        assert_eq!(back, vec![(3, 0), (3, 1), (1, 0), (1, 1)]);
    }
}
