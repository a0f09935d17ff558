//! DualPipe and DualPipeV (DeepSeek-V3 report; deepseek-ai/DualPipe), and the
//! seed's DualPipe stage-contract helpers.
//!
//! **Stages in the IR.** DualPipeV: P ranks, 2P stages on the V map (rank r
//! holds stages r and 2P−1−r), one chain 0..2P, all M microbatches enter at
//! rank 0 and the loss is on rank 0 (stage 2P−1). DualPipe: P ranks (P even)
//! and P model stages, each held twice; the IR numbers the forward-direction
//! copies 0..P (stage s on rank s, microbatches 0..M/2) and the reverse-
//! direction copies P..2P (model stage s as IR stage P+s, on rank P−1−s,
//! microbatches M/2..M) — two chains, the same V map.
//!
//! **Per-rank program.** With H = P/2, h = min(r, P−1−r), C = M/2 for
//! DualPipe and H = P, h = r, C = M for DualPipeV; phase "0" is the rank's
//! stage on which its microbatches travel away from their entry rank ("1" the
//! other; flipped for the second half of DualPipe's ranks). "zb" = the
//! backward runs as I and queues its W (FIFO); "W" pops one queued W.
//!
//! | phase | pattern | count |
//! |---|---|---|
//! | 1 | F0 | 2(H−h−1) |
//! | 2 | F0 F1 | h+1 |
//! | 3 | B1(zb) W F1 | H−h−1 |
//! | 4 | (F0;B1) (F1;B0); first F0, B1 apart on the turning rank(s) | C−2H+h+1 |
//! | 5 | B1 (F1;B0) | H−h−1 |
//! | 6 | B1 B0, zb from i = (h+1)/2 (before B1 if h odd, after it if even) | h+1 |
//! | 7 | W B0(zb) | H−h−1 |
//! | 8 | W | h+1 |
//!
//! Every rank ends with an empty W queue; each of F0, F1, B0, B1 runs C times.

use super::{check_min_microbatches, check_ranks};
use crate::error::{Error, Result};
use crate::ir::{Action, Op, OpKind};
use crate::maps::{Chain, StageMap};
use crate::schedule::Schedule;
use megamoe_plan::ScheduleKind;
use std::collections::VecDeque;

/// One rank's program under construction: per-phase counters and the W queue.
struct DualRank {
    stage: [usize; 2],
    first_microbatch: [usize; 2],
    next_f: [usize; 2],
    next_b: [usize; 2],
    pending_w: VecDeque<Op>,
    ops: Vec<Option<Action>>,
}

impl DualRank {
    fn forward_op(&mut self, phase: usize) -> Op {
        let mb = self.first_microbatch[phase] + self.next_f[phase];
        self.next_f[phase] += 1;
        Op::new(self.stage[phase], OpKind::F, mb)
    }

    /// The next backward of `phase`: I (W queued) when `zb`, else B.
    fn backward_op(&mut self, phase: usize, zb: bool) -> Op {
        let mb = self.first_microbatch[phase] + self.next_b[phase];
        self.next_b[phase] += 1;
        let stage = self.stage[phase];
        if zb {
            self.pending_w.push_back(Op::new(stage, OpKind::W, mb));
            Op::new(stage, OpKind::I, mb)
        } else {
            Op::new(stage, OpKind::B, mb)
        }
    }

    fn f(&mut self, phase: usize) {
        let op = self.forward_op(phase);
        self.ops.push(Some(Action::Op(op)));
    }

    fn b(&mut self, phase: usize, zb: bool) {
        let op = self.backward_op(phase, zb);
        self.ops.push(Some(Action::Op(op)));
    }

    fn w(&mut self) {
        let op = self
            .pending_w
            .pop_front()
            .expect("DualPipe phases pop only queued W's");
        self.ops.push(Some(Action::Op(op)));
    }

    /// `(F phase_f ; B phase_b)` as one OVERLAP_F_B unit (full backward).
    fn overlap(&mut self, phase_f: usize, phase_b: usize) {
        let f = self.forward_op(phase_f);
        let b = self.backward_op(phase_b, false);
        self.ops.push(Some(Action::OverlapFB { f, b }));
    }
}

/// Builds one rank's program from the eight phases. `half` = H, `h` = the
/// rank's distance from its entry end, `chunks` = C.
fn eight_phases(mut d: DualRank, half: usize, h: usize, chunks: usize) -> Vec<Option<Action>> {
    let turning_rank = h == half - 1;
    // Phase 1: F0 — warmup forwards away from the entry rank.
    let n_warmup = 2 * (half - h - 1);
    for _ in 0..n_warmup {
        d.f(0);
    }
    // Phase 2: F0 F1 — both directions start.
    let n_both = h + 1;
    for _ in 0..n_both {
        d.f(0);
        d.f(1);
    }
    // Phase 3: B1(zb) W F1 — first backwards, W run at once.
    let n_bwf = half - h - 1;
    for _ in 0..n_bwf {
        d.b(1, true);
        d.w();
        d.f(1);
    }
    // Phase 4: (F0;B1) (F1;B0) — main overlapped steady state.
    let n_main = chunks + h + 1 - 2 * half;
    for i in 0..n_main {
        if i == 0 && turning_rank {
            // Not overlapped: the F0 output feeds F1 on this rank (V) or the
            // mirror rank (DualPipe) and B1 should start as early as possible.
            d.f(0);
            d.b(1, false);
        } else {
            d.overlap(0, 1);
        }
        d.overlap(1, 0);
    }
    // Phase 5: B1 (F1;B0) — forwards of phase 0 are done.
    let n_tail = half - h - 1;
    for _ in 0..n_tail {
        d.b(1, false);
        d.overlap(1, 0);
    }
    // Phase 6: B1 B0 — zero bubble turns on half way through.
    let n_drain = h + 1;
    let mut zb = false;
    for i in 0..n_drain {
        if i == n_drain / 2 && !h.is_multiple_of(2) {
            zb = true;
        }
        d.b(1, zb);
        if i == n_drain / 2 && h.is_multiple_of(2) {
            zb = true;
        }
        d.b(0, zb);
    }
    // Phase 7: W B0(zb) — queued W's fill the wait for the last B0's.
    let n_wb = half - h - 1;
    for _ in 0..n_wb {
        d.w();
        d.b(0, true);
    }
    // Phase 8: W — empty the queue.
    let n_w = h + 1;
    for _ in 0..n_w {
        d.w();
    }
    assert!(
        d.pending_w.is_empty(),
        "DualPipe postcondition: the W queue ends empty"
    );
    d.ops
}

/// Rank `rank`'s DualPipeV program (stages `rank`, `2P−1−rank`). Needs `M >= 2P`.
pub fn dualpipev_rank(
    rank: usize,
    ranks: usize,
    microbatches: usize,
) -> Result<Vec<Option<Action>>> {
    check_ranks(ranks)?;
    check_min_microbatches(
        ScheduleKind::DualPipeV,
        microbatches,
        2 * ranks,
        "m >= 2*pp",
    )?;
    let d = DualRank {
        stage: [rank, 2 * ranks - 1 - rank],
        first_microbatch: [0, 0],
        next_f: [0; 2],
        next_b: [0; 2],
        pending_w: VecDeque::new(),
        ops: Vec::new(),
    };
    Ok(eight_phases(d, ranks, rank, microbatches))
}

/// DualPipeV on `ranks` ranks: 2P stages on the V map, one chain.
pub fn dualpipev(ranks: usize, microbatches: usize) -> Result<Schedule> {
    check_ranks(ranks)?;
    let programs = (0..ranks)
        .map(|r| dualpipev_rank(r, ranks, microbatches))
        .collect::<Result<Vec<_>>>()?;
    Ok(Schedule {
        kind: Some(ScheduleKind::DualPipeV),
        stage_map: StageMap::v_shape(ranks),
        chains: vec![Chain::linear(2 * ranks, microbatches)],
        programs,
    })
}

fn check_dualpipe(ranks: usize, microbatches: usize) -> Result<()> {
    let kind = ScheduleKind::DualPipe;
    check_ranks(ranks)?;
    if !ranks.is_multiple_of(2) {
        return Err(Error::OddRanks { kind, pp: ranks });
    }
    if !microbatches.is_multiple_of(2) {
        return Err(Error::OddMicrobatches { kind, microbatches });
    }
    check_min_microbatches(kind, microbatches, 2 * ranks, "m >= 2*pp")
}

/// Rank `rank`'s DualPipe program. Needs P even, M even, `M >= 2P`.
pub fn dualpipe_rank(
    rank: usize,
    ranks: usize,
    microbatches: usize,
) -> Result<Vec<Option<Action>>> {
    check_dualpipe(ranks, microbatches)?;
    let chunks = microbatches / 2;
    // IR stages: forward copy `rank`, reverse copy `2P−1−rank` (model stage P−1−rank).
    let (forward, reverse) = (rank, 2 * ranks - 1 - rank);
    let second_half = rank >= ranks / 2;
    let (stage, first_microbatch) = if second_half {
        ([reverse, forward], [chunks, 0])
    } else {
        ([forward, reverse], [0, chunks])
    };
    let d = DualRank {
        stage,
        first_microbatch,
        next_f: [0; 2],
        next_b: [0; 2],
        pending_w: VecDeque::new(),
        ops: Vec::new(),
    };
    let h = rank.min(ranks - 1 - rank);
    Ok(eight_phases(d, ranks / 2, h, chunks))
}

/// DualPipe on `ranks` ranks: two chains (0..P forward, P..2P reverse) on the V map.
pub fn dualpipe(ranks: usize, microbatches: usize) -> Result<Schedule> {
    check_dualpipe(ranks, microbatches)?;
    let programs = (0..ranks)
        .map(|r| dualpipe_rank(r, ranks, microbatches))
        .collect::<Result<Vec<_>>>()?;
    let c = microbatches / 2;
    Ok(Schedule {
        kind: Some(ScheduleKind::DualPipe),
        stage_map: StageMap::mirrored(ranks),
        chains: vec![
            Chain {
                stages: (0..ranks).collect(),
                microbatches: 0..c,
            },
            Chain {
                stages: (ranks..2 * ranks).collect(),
                microbatches: c..microbatches,
            },
        ],
        programs,
    })
}

/// Seed contract: DualPipeV on `pp` ranks has `2·pp` stages.
pub fn dualpipev_stage_count(pp: usize) -> usize {
    2 * pp
}

/// Seed contract: explicit stage boundaries (one entry per stage, e.g. each
/// stage's first layer) must describe exactly `2·pp` stages.
pub fn check_dualpipev_boundaries(pp: usize, boundaries: &[usize]) -> Result<()> {
    let expected = dualpipev_stage_count(pp);
    if boundaries.len() != expected {
        return Err(Error::StageCountMismatch {
            pp,
            expected,
            got: boundaries.len(),
        });
    }
    Ok(())
}

/// Seed contract: auxiliary losses under DualPipe are scaled by
/// `1 / (grad_accum_steps · num_chunks)`, exactly once; both must be >= 1.
pub fn dualpipe_aux_loss_scale(grad_accum_steps: usize, num_chunks: usize) -> Result<f64> {
    if grad_accum_steps < 1 {
        return Err(Error::AuxScaleInput {
            field: "grad_accum_steps",
            value: grad_accum_steps,
        });
    }
    if num_chunks < 1 {
        return Err(Error::AuxScaleInput {
            field: "num_chunks",
            value: num_chunks,
        });
    }
    Ok(1.0 / (grad_accum_steps as f64 * num_chunks as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dualpipev_stage_count_is_twice_pp() {
        assert_eq!(dualpipev_stage_count(4), 8);
        assert!(check_dualpipev_boundaries(4, &[0, 3, 6, 9, 12, 15, 18, 21]).is_ok());
    }

    #[test]
    fn dualpipev_boundary_mismatch_names_both_numbers() {
        let e = check_dualpipev_boundaries(4, &[0, 4, 8, 12, 16, 20]).unwrap_err();
        assert_eq!(
            e,
            Error::StageCountMismatch {
                pp: 4,
                expected: 8,
                got: 6
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("6 stages") && msg.contains("2*pp=8"), "{msg}");
    }

    #[test]
    fn aux_loss_scale_is_inverse_of_accum_times_chunks() {
        // 1 / (4 · 2) = 0.125 ; 1 / (1 · 1) = 1 ; 1 / (3 · 10) = 1/30.
        assert_eq!(dualpipe_aux_loss_scale(4, 2).unwrap(), 0.125);
        assert_eq!(dualpipe_aux_loss_scale(1, 1).unwrap(), 1.0);
        assert!((dualpipe_aux_loss_scale(3, 10).unwrap() - 1.0 / 30.0).abs() < 1e-15);
    }

    #[test]
    fn aux_loss_scale_inputs_below_one_are_rejected() {
        let e = dualpipe_aux_loss_scale(0, 2).unwrap_err();
        assert_eq!(
            e,
            Error::AuxScaleInput {
                field: "grad_accum_steps",
                value: 0
            }
        );
        let e = dualpipe_aux_loss_scale(2, 0).unwrap_err();
        assert!(e.to_string().contains("num_chunks=0 must be >= 1"), "{e}");
    }

    #[test]
    fn dualpipe_preconditions_are_named_errors() {
        assert!(matches!(
            dualpipe(3, 12),
            Err(Error::OddRanks { pp: 3, .. })
        ));
        assert!(matches!(
            dualpipe(4, 9),
            Err(Error::OddMicrobatches {
                microbatches: 9,
                ..
            })
        ));
        assert!(matches!(
            dualpipe(4, 6),
            Err(Error::TooFewMicrobatches { min: 8, .. })
        ));
        assert!(matches!(
            dualpipev(4, 7),
            Err(Error::TooFewMicrobatches { min: 8, .. })
        ));
    }

    #[test]
    fn dualpipev_last_rank_runs_first_main_step_unoverlapped() {
        // P = 2, M = 4, rank 1 (h = 1 = H−1): phase 2 = F0 F1 twice (stages 1, 2),
        // phase 4 starts with a separate 1F2 then 2B0, then (2F2;1B0).
        let ops = dualpipev_rank(1, 2, 4).unwrap();
        let text: Vec<String> = ops.iter().flatten().map(|a| a.to_string()).collect();
        assert_eq!(
            &text[..7],
            [
                "1F0",
                "2F0",
                "1F1",
                "2F1",
                "1F2",
                "2B0",
                "(2F2;1B0)OVERLAP_F_B"
            ]
        );
    }
}
