//! DualPipe and DualPipeV pinned op by op against an independent reference,
//! and the simulator checked against hand-computed timelines with non-zero
//! communication latency and F ≠ I.
//!
//! The reference is the `step` loop of the public DualPipe algorithm
//! (deepseek-ai/DualPipe, `dualpipe.py` / `dualpipev.py`), re-derived here in
//! two forms that share nothing with the generator:
//! * literal programs for the smallest cases, worked out by hand from the
//!   eight steps (comments show the step of each op);
//! * `reference_program`: the eight steps as a list of *symbols* (`F0`, `B1`,
//!   `B1zb`, `W`, `F0B1` = one overlapped unit, ...) resolved to ops in a
//!   second pass with per-direction micro-batch counters and a FIFO of
//!   deferred weight gradients (the reference's `WeightGradStore`).

#![allow(clippy::unwrap_used)] // test helpers may unwrap, as tests may

use megamoe_pipeline::{generate, simulate, validate, Costs, PipelineShape, Schedule, Simulation};
use megamoe_plan::ScheduleKind;
use std::collections::VecDeque;

fn program_text(s: &Schedule, rank: usize) -> Vec<String> {
    s.programs[rank]
        .iter()
        .flatten()
        .map(|a| a.to_string())
        .collect()
}

fn shape(ranks: usize, microbatches: usize) -> PipelineShape {
    PipelineShape {
        ranks,
        microbatches,
        vpp: 1,
    }
}

#[test]
fn dualpipev_two_ranks_four_microbatches_by_hand() {
    // P = 2, M = 4: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2.
    let s = generate(ScheduleKind::DualPipeV, shape(2, 4)).unwrap();
    let rank0 = [
        "0F0",
        "0F1", // step 1: 2(P-r-1) = 2 x F0
        "0F2",
        "3F0", // step 2: r+1 = 1 x F0 F1
        "3I0",
        "3W0",
        "3F1",                  // step 3: B1 (zero bubble) W F1
        "(0F3;3B1)OVERLAP_F_B", // step 4 (M-2P+r+1 = 1): F0&B1, F1&B0
        "(3F2;0B0)OVERLAP_F_B",
        "3B2",
        "(3F3;0B1)OVERLAP_F_B", // step 5: B1, F1&B0
        "3B3",
        "0I2", // step 6: B1 B0, zero bubble on after B1 (r even)
        "0W2",
        "0I3", // step 7: W B0(zb)
        "0W3", // step 8: W
    ];
    let rank1 = [
        "1F0",
        "2F0",
        "1F1",
        "2F1", // step 2: 2 x F0 F1
        "1F2",
        "2B0", // step 4, i = 0 on the last rank: F0 and B1 apart
        "(2F2;1B0)OVERLAP_F_B",
        "(1F3;2B1)OVERLAP_F_B", // step 4, i = 1
        "(2F3;1B1)OVERLAP_F_B",
        "2B2",
        "1B2", // step 6, i = 0: zero bubble still off
        "2I3",
        "1I3", // step 6, i = 1: on before B1 (r odd)
        "2W3",
        "1W3", // step 8
    ];
    assert_eq!(program_text(&s, 0), rank0);
    assert_eq!(program_text(&s, 1), rank1);
}

#[test]
fn dualpipe_two_ranks_four_microbatches_by_hand() {
    // P = 2, M = 4: forward chain 0 -> 1 takes micro-batches 0, 1; reverse
    // chain 2 -> 3 (model stage 0 on rank 1, model stage 1 on rank 0) takes 2, 3.
    // Both ranks are middle ranks; rank 1 is in the second half (phases swapped).
    let s = generate(ScheduleKind::DualPipe, shape(2, 4)).unwrap();
    let rank0 = [
        "0F0",
        "3F2", // step 2: F0 F1
        "0F1",
        "3B2", // step 4, i = 0 on a middle rank: F0 and B1 apart
        "(3F3;0B0)OVERLAP_F_B",
        "3B3",
        "0I1", // step 6: B1, then zero bubble on (half rank 0 even)
        "0W1", // step 8
    ];
    let rank1 = [
        "2F2",
        "1F0",
        "2F3",
        "1B0",
        "(1F1;2B2)OVERLAP_F_B",
        "1B1",
        "2I3",
        "2W3",
    ];
    assert_eq!(program_text(&s, 0), rank0);
    assert_eq!(program_text(&s, 1), rank1);
}

/// The eight steps as symbols for one rank (reference form). `half` = P/2
/// (DualPipe) or P (DualPipeV); `h` = half rank; `chunks` = micro-batches per
/// direction; `turning` = the rank where the V turns (DualPipeV's last rank,
/// DualPipe's two middle ranks).
fn reference_symbols(half: usize, h: usize, chunks: usize, turning: bool) -> Vec<&'static str> {
    let mut v = Vec::new();
    v.extend(std::iter::repeat_n("F0", (half - h - 1) * 2));
    for _ in 0..h + 1 {
        v.extend(["F0", "F1"]);
    }
    for _ in 0..half - h - 1 {
        v.extend(["B1zb", "W", "F1"]);
    }
    for i in 0..chunks + h + 1 - 2 * half {
        if i == 0 && turning {
            v.extend(["F0", "B1"]);
        } else {
            v.push("F0B1");
        }
        v.push("F1B0");
    }
    for _ in 0..half - h - 1 {
        v.extend(["B1", "F1B0"]);
    }
    let steps6 = h + 1;
    let mut zb = false;
    for i in 0..steps6 {
        if i == steps6 / 2 && h % 2 == 1 {
            zb = true;
        }
        v.push(if zb { "B1zb" } else { "B1" });
        if i == steps6 / 2 && h.is_multiple_of(2) {
            zb = true;
        }
        v.push(if zb { "B0zb" } else { "B0" });
    }
    for _ in 0..half - h - 1 {
        v.extend(["W", "B0zb"]);
    }
    v.extend(std::iter::repeat_n("W", h + 1));
    v
}

/// Resolves symbols to ops: phase p runs on `stage[p]` with micro-batches
/// from `first_mb[p]`, one forward and one backward counter per phase.
fn resolve(symbols: &[&str], stage: [usize; 2], first_mb: [usize; 2]) -> Vec<String> {
    let mut next_f = first_mb;
    let mut next_b = first_mb;
    let mut weights: VecDeque<String> = VecDeque::new();
    let mut fwd = |p: usize| {
        next_f[p] += 1;
        format!("{}F{}", stage[p], next_f[p] - 1)
    };
    let mut out = Vec::new();
    let mut bwd = |p: usize, zb: bool, weights: &mut VecDeque<String>| {
        next_b[p] += 1;
        let mb = next_b[p] - 1;
        if zb {
            weights.push_back(format!("{}W{mb}", stage[p]));
            format!("{}I{mb}", stage[p])
        } else {
            format!("{}B{mb}", stage[p])
        }
    };
    for sym in symbols {
        let op = match *sym {
            "F0" => fwd(0),
            "F1" => fwd(1),
            "B0" | "B1" | "B0zb" | "B1zb" => {
                let p = usize::from(sym.as_bytes()[1] == b'1');
                bwd(p, sym.ends_with("zb"), &mut weights)
            }
            "W" => weights.pop_front().unwrap(),
            "F0B1" => {
                let f = fwd(0);
                format!("({f};{})OVERLAP_F_B", bwd(1, false, &mut weights))
            }
            "F1B0" => {
                let f = fwd(1);
                format!("({f};{})OVERLAP_F_B", bwd(0, false, &mut weights))
            }
            other => panic!("unknown symbol {other}"),
        };
        out.push(op);
    }
    assert!(weights.is_empty(), "reference: W queue must end empty");
    out
}

fn reference_dualpipev(p: usize, m: usize, rank: usize) -> Vec<String> {
    let symbols = reference_symbols(p, rank, m, rank == p - 1);
    resolve(&symbols, [rank, 2 * p - 1 - rank], [0, 0])
}

fn reference_dualpipe(p: usize, m: usize, rank: usize) -> Vec<String> {
    let half = p / 2;
    let h = rank.min(p - 1 - rank);
    let c = m / 2;
    let symbols = reference_symbols(half, h, c, h == half - 1);
    // Forward copy of model stage r is stage r (micro-batches 0..C); reverse
    // copy of model stage P-1-r is stage 2P-1-r (micro-batches C..M). The
    // second half of the ranks swaps the phases.
    let (fwd, rev) = ((rank, 0), (2 * p - 1 - rank, c));
    let (a, b) = if rank < half { (fwd, rev) } else { (rev, fwd) };
    resolve(&symbols, [a.0, b.0], [a.1, b.1])
}

#[test]
fn dualpipev_matches_the_reference_on_every_rank() {
    for (p, m) in [
        (1, 2),
        (2, 5),
        (3, 6),
        (3, 9),
        (4, 8),
        (4, 11),
        (5, 10),
        (6, 12),
        (8, 16),
        (8, 20),
    ] {
        let s = generate(ScheduleKind::DualPipeV, shape(p, m)).unwrap();
        validate(&s).unwrap();
        for r in 0..p {
            assert_eq!(
                program_text(&s, r),
                reference_dualpipev(p, m, r),
                "P={p} M={m} rank {r}"
            );
        }
    }
}

#[test]
fn dualpipe_matches_the_reference_on_every_rank() {
    for (p, m) in [
        (2, 6),
        (4, 8),
        (4, 10),
        (4, 14),
        (6, 12),
        (6, 16),
        (8, 16),
        (8, 22),
    ] {
        let s = generate(ScheduleKind::DualPipe, shape(p, m)).unwrap();
        validate(&s).unwrap();
        for r in 0..p {
            assert_eq!(
                program_text(&s, r),
                reference_dualpipe(p, m, r),
                "P={p} M={m} rank {r}"
            );
        }
    }
}

fn starts_ends(sim: &Simulation, rank: usize) -> Vec<(String, f64, f64)> {
    sim.timeline[rank]
        .iter()
        .map(|t| (t.action.to_string(), t.start, t.end))
        .collect()
}

fn timed(list: &[(&str, f64, f64)]) -> Vec<(String, f64, f64)> {
    list.iter()
        .map(|&(a, s, e)| (a.to_string(), s, e))
        .collect()
}

#[test]
fn simulator_adds_comm_latency_on_cross_rank_edges() {
    // 1F1B, P = 2, M = 2, F = 1, B = 2, comm = 0.5 (times worked out by hand):
    // rank 0: F0 [0,1] F1 [1,2]; rank 1: F0 waits for 0F0 + 0.5.
    let s = generate(ScheduleKind::OneFOneB, shape(2, 2)).unwrap();
    let sim = simulate(&s, &Costs::constant(1.0, 1.0, 1.0, 2.0, None, 0.5)).unwrap();
    let r0 = [
        ("0F0", 0.0, 1.0),
        ("0F1", 1.0, 2.0),
        ("0B0", 5.0, 7.0),
        ("0B1", 8.0, 10.0),
    ];
    let r1 = [
        ("1F0", 1.5, 2.5),
        ("1B0", 2.5, 4.5),
        ("1F1", 4.5, 5.5),
        ("1B1", 5.5, 7.5),
    ];
    assert_eq!(starts_ends(&sim, 0), timed(&r0));
    assert_eq!(starts_ends(&sim, 1), timed(&r1));
    assert_eq!(sim.makespan, 10.0);
    assert_eq!(sim.ranks[0].bubble, 4.0);
    assert_eq!(sim.ranks[1].bubble, 4.0);
}

#[test]
fn simulator_handles_forward_and_input_backward_of_different_cost() {
    // ZB-H1, P = 2, M = 2, F = 2, I = 1, W = 0.5, comm = 0.25 (by hand).
    let s = generate(ScheduleKind::ZbH1, shape(2, 2)).unwrap();
    let sim = simulate(&s, &Costs::constant(2.0, 1.0, 0.5, 1.5, None, 0.25)).unwrap();
    let r0 = [
        ("0F0", 0.0, 2.0),
        ("0F1", 2.0, 4.0),
        ("0I0", 5.5, 6.5), // waits for 1I0 (ends 5.25) + 0.25
        ("0W0", 6.5, 7.0),
        ("0I1", 8.5, 9.5), // waits for 1I1 (ends 8.25) + 0.25
        ("0W1", 9.5, 10.0),
    ];
    let r1 = [
        ("1F0", 2.25, 4.25),
        ("1I0", 4.25, 5.25),
        ("1F1", 5.25, 7.25),
        ("1I1", 7.25, 8.25),
        ("1W0", 8.25, 8.75),
        ("1W1", 8.75, 9.25),
    ];
    assert_eq!(starts_ends(&sim, 0), timed(&r0));
    assert_eq!(starts_ends(&sim, 1), timed(&r1));
    assert_eq!(sim.makespan, 10.0);
    assert_eq!(sim.ranks[0].busy, 7.0);
    assert_eq!(sim.ranks[1].bubble, 3.0);
}
