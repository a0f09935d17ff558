//! The communication pass: a lockstep dry run that inserts SEND/RECV pairs
//! and proves the schedule makes progress.
//!
//! Each round, every rank looks at its next action and runs it if everything
//! it needs was produced in an earlier round (lockstep: what one rank produces
//! in a round is visible to the others in the next). An action whose input
//! comes from another rank is preceded by a RECV, and an op whose output goes
//! to another rank is followed by a SEND: `RECV_F` before an F whose previous
//! stage lives elsewhere, `SEND_F` after an F whose next stage lives
//! elsewhere, and `RECV_B`/`SEND_B` likewise for I and B. A round in which no
//! rank moves while some still have actions is a deadlock, reported with each
//! stuck rank, its action and what it waits for.
//!
//! Then the receives are put in the senders' order (the order contract of
//! [`crate::p2p`]): where a rank first needs message X from a peer, it
//! receives every message that peer sent it before X and has not been
//! received yet, in send order, then X. Those earlier messages were sent
//! before X, so they are there when X is: the program still progresses, and
//! one tagless FIFO channel per ordered pair of ranks suffices. (Without this
//! step ZBV, DualPipeV with P ≥ 3 and DualPipe with P ≥ 6 receive
//! activations and gradients from one peer in another order than it sends them.)

use crate::error::{Error, Result, StuckRank};
use crate::ir::{Action, Op, OpKind};
use crate::p2p::{check_message_order, Message};
use crate::schedule::{event_text, Done, Event, Schedule, Topology};
use std::collections::{HashMap, HashSet, VecDeque};

/// Per-rank programs with SEND/RECV ops inserted (idle ticks dropped), and
/// the number of lockstep rounds the dry run took.
#[derive(Debug, Clone, PartialEq)]
pub struct CommSchedule {
    /// `programs[rank]`: compute actions with their p2p ops.
    pub programs: Vec<Vec<Action>>,
    /// Lockstep rounds until every rank finished.
    pub rounds: usize,
}

/// Runs the lockstep dry run over `schedule` and inserts SEND/RECV pairs.
/// Errors with [`Error::NotProgressing`] when a round makes no progress.
pub fn insert_send_recv(schedule: &Schedule) -> Result<CommSchedule> {
    let topo = Topology::new(schedule);
    let map = &schedule.stage_map;
    let ranks = schedule.ranks();
    let mut cursor = vec![0usize; ranks];
    let mut done: HashSet<Event> = HashSet::new();
    let mut out: Vec<Vec<Action>> = vec![Vec::new(); ranks];
    let mut rounds = 0;
    let needs_of = |a: &Action| -> Vec<Event> {
        let own: Vec<Event> = a.ops().flat_map(Topology::produces).collect();
        let mut v: Vec<Event> = a
            .ops()
            .flat_map(|op| topo.needs(op))
            .filter(|e| !own.contains(e))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    loop {
        let finished = (0..ranks).all(|r| cursor[r] >= schedule.programs[r].len());
        if finished {
            let programs = receive_in_send_order(schedule, out);
            check_message_order(schedule, &programs)?;
            return Ok(CommSchedule { programs, rounds });
        }
        rounds += 1;
        let mut fresh: Vec<Event> = Vec::new();
        let mut moved = false;
        for r in 0..ranks {
            let Some(entry) = schedule.programs[r].get(cursor[r]) else {
                continue;
            };
            let Some(action) = entry else {
                cursor[r] += 1; // idle tick
                moved = true;
                continue;
            };
            let needs = needs_of(action);
            if !needs.iter().all(|e| done.contains(e)) {
                continue;
            }
            for op in action.ops() {
                for &(s, what, mb) in &topo.needs(op) {
                    if map.rank(s) != Some(r) {
                        let kind = if what == Done::F {
                            OpKind::RecvF
                        } else {
                            OpKind::RecvB
                        };
                        out[r].push(Action::Op(Op::new(op.stage, kind, mb)));
                    }
                }
            }
            out[r].push(*action);
            for op in action.ops() {
                let Some(mb) = op.microbatch else { continue };
                let Some(Some(pos)) = topo.pos.get(op.stage) else {
                    continue;
                };
                let peer = match op.kind {
                    OpKind::F => pos.next.map(|s| (s, OpKind::SendF)),
                    OpKind::I | OpKind::B => pos.prev.map(|s| (s, OpKind::SendB)),
                    _ => None,
                };
                if let Some((s, kind)) = peer {
                    if map.rank(s) != Some(r) {
                        out[r].push(Action::Op(Op::new(op.stage, kind, mb)));
                    }
                }
                fresh.extend(Topology::produces(op));
            }
            cursor[r] += 1;
            moved = true;
        }
        if !moved {
            let stuck = (0..ranks)
                .filter_map(|r| {
                    let action = schedule.programs[r].get(cursor[r])?.as_ref()?;
                    let waiting_for = needs_of(action)
                        .into_iter()
                        .filter(|e| !done.contains(e))
                        .map(event_text)
                        .collect();
                    Some(StuckRank {
                        rank: r,
                        action: action.to_string(),
                        waiting_for,
                    })
                })
                .collect();
            return Err(Error::NotProgressing { stuck });
        }
        done.extend(fresh);
    }
}

/// Moves RECV ops so that each rank receives from each peer in the peer's
/// send order (module doc). `programs` have a RECV right before each op that
/// needs a remote input.
fn receive_in_send_order(schedule: &Schedule, programs: Vec<Vec<Action>>) -> Vec<Vec<Action>> {
    // The RECV op (on the receiving rank) of every sent message, per (src, dst), in send order.
    let mut queue: HashMap<(usize, usize), VecDeque<(Message, Op)>> = HashMap::new();
    for program in &programs {
        for op in program.iter().flat_map(|a| a.ops()) {
            let Some(m) = schedule.message(op) else {
                continue;
            };
            let recv_kind = match op.kind {
                OpKind::SendF => OpKind::RecvF,
                OpKind::SendB => OpKind::RecvB,
                _ => continue,
            };
            let recv = Op::new(m.to_stage, recv_kind, m.microbatch);
            queue
                .entry((m.src, m.dst))
                .or_default()
                .push_back((m, recv));
        }
    }
    programs
        .into_iter()
        .map(|program| {
            let mut received: HashSet<Message> = HashSet::new();
            let mut out = Vec::with_capacity(program.len());
            for action in program {
                let wanted = match action {
                    Action::Op(op) if matches!(op.kind, OpKind::RecvF | OpKind::RecvB) => {
                        schedule.message(op)
                    }
                    _ => None,
                };
                let Some(wanted) = wanted else {
                    out.push(action);
                    continue;
                };
                if received.contains(&wanted) {
                    continue; // received earlier, in the sender's order
                }
                let q = queue.entry((wanted.src, wanted.dst)).or_default();
                while let Some((m, recv)) = q.pop_front() {
                    out.push(Action::Op(recv));
                    received.insert(m);
                    if m == wanted {
                        break;
                    }
                }
                if !received.contains(&wanted) {
                    // Never sent: leave the RECV in place; the order check names it.
                    out.push(action);
                }
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{Chain, StageMap};

    fn two_rank(text: &str) -> Schedule {
        Schedule::from_compute_only(text, StageMap::looped(2, 1), vec![Chain::linear(2, 1)])
            .unwrap()
    }

    #[test]
    fn send_recv_pairs_wrap_cross_rank_edges() {
        let c = insert_send_recv(&two_rank("0F0,0B0\n1F0,1B0\n")).unwrap();
        let text = |r: usize| {
            c.programs[r]
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(text(0), ["0F0", "0SEND_F0", "0RECV_B0", "0B0"]);
        assert_eq!(text(1), ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]);
        // 0F0 | 1F0 | 1B0 | 0B0: four lockstep rounds.
        assert_eq!(c.rounds, 4);
    }

    #[test]
    fn deadlock_names_stuck_ranks_and_actions() {
        // Rank 0 waits for 1B0 before its forward; rank 1 needs 0F0 first.
        let e = insert_send_recv(&two_rank("0B0,0F0\n1F0,1B0\n")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("schedule is not progressing"), "{msg}");
        assert!(
            msg.contains("rank 0 at 0B0") && msg.contains("rank 1 at 1F0"),
            "{msg}"
        );
        assert!(msg.contains("0F0"), "{msg}");
    }
}
