//! The p2p order contract over every schedule kind and a grid of pipeline
//! sizes: for every ordered pair of ranks, the messages one rank sends (in
//! program order) are exactly the messages the other receives (in program
//! order), activations and gradients interleaved alike — so one tagless FIFO
//! channel per pair delivers each tensor to the op that expects it. Also:
//! every RECV comes before the op that consumes it and every SEND after the
//! op that produces it. Message identities are derived here from the chains
//! and the stage map, independently of the crate's own `Schedule::message`.

#![allow(clippy::unwrap_used)] // test helpers may unwrap, as tests may

use megamoe_pipeline::{generate, validate, Action, Op, OpKind, PipelineShape, Schedule, StageMap};
use megamoe_plan::ScheduleKind;
use std::collections::HashMap;

/// (activation?, from stage, to stage, microbatch).
type Msg = (bool, usize, usize, usize);

fn neighbours(s: &Schedule) -> (HashMap<usize, usize>, HashMap<usize, usize>) {
    let (mut prev, mut next) = (HashMap::new(), HashMap::new());
    for chain in &s.chains {
        for w in chain.stages.windows(2) {
            next.insert(w[0], w[1]);
            prev.insert(w[1], w[0]);
        }
    }
    (prev, next)
}

/// Checks the contract on one schedule; returns the number of messages.
fn check(s: &Schedule, what: &str) -> usize {
    let comm = validate(s).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (prev, next) = neighbours(s);
    let rank = |stage: usize| s.stage_map.rank(stage).unwrap();
    let mut sent: HashMap<(usize, usize), Vec<Msg>> = HashMap::new();
    let mut received: HashMap<(usize, usize), Vec<Msg>> = HashMap::new();
    for (r, program) in comm.programs.iter().enumerate() {
        let ops: Vec<Op> = program.iter().flat_map(Action::ops).collect();
        for (at, op) in ops.iter().enumerate() {
            let mb = op.microbatch.unwrap_or(usize::MAX);
            let (msg, peer, is_send) = match op.kind {
                OpKind::SendF => (
                    (true, op.stage, next[&op.stage], mb),
                    rank(next[&op.stage]),
                    true,
                ),
                OpKind::SendB => (
                    (false, op.stage, prev[&op.stage], mb),
                    rank(prev[&op.stage]),
                    true,
                ),
                OpKind::RecvF => (
                    (true, prev[&op.stage], op.stage, mb),
                    rank(prev[&op.stage]),
                    false,
                ),
                OpKind::RecvB => (
                    (false, next[&op.stage], op.stage, mb),
                    rank(next[&op.stage]),
                    false,
                ),
                _ => continue,
            };
            assert_ne!(peer, r, "{what}: rank {r} {op} talks to itself");
            // Producer before SEND, RECV before consumer, on this rank.
            let (stage, kinds): (usize, &[OpKind]) = match (is_send, msg.0) {
                (true, true) => (msg.1, &[OpKind::F]),
                (true, false) => (msg.1, &[OpKind::I, OpKind::B]),
                (false, true) => (msg.2, &[OpKind::F]),
                (false, false) => (msg.2, &[OpKind::I, OpKind::B]),
            };
            let is_user =
                |o: &Op| o.stage == stage && o.microbatch == Some(mb) && kinds.contains(&o.kind);
            if is_send {
                assert!(
                    ops[..at].iter().any(is_user),
                    "{what}: rank {r} {op} before its producer"
                );
                sent.entry((r, peer)).or_default().push(msg);
            } else {
                assert!(
                    ops[at..].iter().any(is_user),
                    "{what}: rank {r} {op} after its consumer"
                );
                received.entry((peer, r)).or_default().push(msg);
            }
        }
    }
    assert_eq!(sent, received, "{what}: sent and received sequences differ");
    sent.values().map(Vec::len).sum()
}

#[test]
fn every_kind_sends_and_receives_in_the_same_order_per_pair() {
    let mut checked = HashMap::new();
    for kind in ScheduleKind::ALL {
        for ranks in 1..=8 {
            for microbatches in 1..=20 {
                for vpp in [2, 3] {
                    if vpp == 3 && kind != ScheduleKind::Interleaved {
                        continue;
                    }
                    let shape = PipelineShape {
                        ranks,
                        microbatches,
                        vpp,
                    };
                    let Ok(s) = generate(kind, shape) else {
                        continue;
                    };
                    // One stage map for the planner and the generators.
                    assert_eq!(s.stage_map, StageMap::for_schedule(kind, ranks, vpp));
                    let n = check(&s, &format!("{kind} pp={ranks} m={microbatches} vpp={vpp}"));
                    // Two or more ranks always exchange messages.
                    assert!(ranks == 1 || n > 0, "{kind} pp={ranks}: no messages");
                    *checked.entry(kind).or_insert(0) += 1;
                }
            }
        }
    }
    // Every kind was exercised on many sizes (the generators refuse some).
    for kind in ScheduleKind::ALL {
        assert!(
            checked.get(&kind).copied().unwrap_or(0) >= 10,
            "{kind}: {checked:?}"
        );
    }
}
