//! Point-to-point topology: which rank a SEND or RECV talks to, what it
//! carries, and the order contract the executor relies on.
//!
//! Every SEND/RECV op of a [`CommSchedule`](crate::CommSchedule) moves one
//! [`Message`]: the hidden state leaving a stage's forward
//! ([`Payload::Activation`], `SEND_F` → `RECV_F`) or the gradient leaving a
//! stage's input backward ([`Payload::Gradient`], `SEND_B` → `RECV_B`).
//! **Order contract:** for every ordered pair of ranks (src, dst), the
//! messages of src's SEND ops to dst, in program order, equal the messages
//! of dst's RECV ops from src, in program order — activations and gradients
//! interleaved the same way on both sides. So one FIFO channel per ordered
//! pair, with no tags (NCCL p2p, an MPI tag per pair, an in-process queue),
//! delivers every tensor to the op that expects it. Sends never block (the
//! transport buffers them); receives block until the message is there.
//!
//! Every message holds the hidden state between stages (or its gradient):
//! [`boundary_shape`] gives its shape for a plan.

use crate::error::{Error, Result};
use crate::ir::{Op, OpKind};
use crate::schedule::Schedule;
use megamoe_plan::Plan;
use serde::Serialize;
use std::collections::HashMap;

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Payload {
    /// A stage's forward output, to the next stage's forward.
    Activation,
    /// The gradient of a stage's input, to the previous stage's backward.
    Gradient,
}

/// One point-to-point message of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Message {
    /// Sending rank.
    pub src: usize,
    /// Receiving rank.
    pub dst: usize,
    /// Activation or gradient.
    pub payload: Payload,
    /// Stage whose op produced it (F for activations, I/B for gradients).
    pub from_stage: usize,
    /// Stage whose op consumes it.
    pub to_stage: usize,
    /// The microbatch.
    pub microbatch: usize,
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.payload {
            Payload::Activation => "activation",
            Payload::Gradient => "gradient",
        };
        write!(
            f,
            "{what} of microbatch {} stage {} (rank {}) -> stage {} (rank {})",
            self.microbatch, self.from_stage, self.src, self.to_stage, self.dst
        )
    }
}

impl Schedule {
    /// The stage before `stage` on its chain (`None` for a chain's first stage).
    pub fn prev_stage(&self, stage: usize) -> Option<usize> {
        self.chains.iter().find_map(|c| {
            let k = c.stages.iter().position(|&s| s == stage)?;
            k.checked_sub(1).map(|j| c.stages[j])
        })
    }

    /// The stage after `stage` on its chain (`None` for a chain's last stage,
    /// the one that owns the loss).
    pub fn next_stage(&self, stage: usize) -> Option<usize> {
        self.chains.iter().find_map(|c| {
            let k = c.stages.iter().position(|&s| s == stage)?;
            c.stages.get(k + 1).copied()
        })
    }

    /// Whether `stage` is the last of its chain (computes the loss).
    pub fn is_last_stage(&self, stage: usize) -> bool {
        self.chains.iter().any(|c| c.stages.last() == Some(&stage))
    }

    /// The message a SEND_F / SEND_B / RECV_F / RECV_B op moves (`None` for
    /// other kinds, or an op whose peer stage does not exist). A SEND op
    /// names the producing stage, a RECV op the consuming stage.
    pub fn message(&self, op: Op) -> Option<Message> {
        let mb = op.microbatch?;
        let rank = |s: usize| self.stage_map.rank(s);
        let (payload, from_stage, to_stage) = match op.kind {
            OpKind::SendF => (Payload::Activation, op.stage, self.next_stage(op.stage)?),
            OpKind::RecvF => (Payload::Activation, self.prev_stage(op.stage)?, op.stage),
            OpKind::SendB => (Payload::Gradient, op.stage, self.prev_stage(op.stage)?),
            OpKind::RecvB => (Payload::Gradient, self.next_stage(op.stage)?, op.stage),
            _ => return None,
        };
        Some(Message {
            src: rank(from_stage)?,
            dst: rank(to_stage)?,
            payload,
            from_stage,
            to_stage,
            microbatch: mb,
        })
    }

    /// The ranks `rank` exchanges messages with (either direction), ascending.
    pub fn peers(&self, rank: usize) -> Vec<usize> {
        let mut peers: Vec<usize> = self
            .stage_map
            .stages_of(rank)
            .into_iter()
            .flat_map(|s| [self.prev_stage(s), self.next_stage(s)])
            .flatten()
            .filter_map(|s| self.stage_map.rank(s))
            .filter(|&p| p != rank)
            .collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }
}

/// Checks the order contract (module doc) over per-rank programs with
/// SEND/RECV ops: for each (src, dst) the sent and received message
/// sequences are equal. Errors with [`Error::MessageOrder`] at the first
/// difference.
pub fn check_message_order(schedule: &Schedule, programs: &[Vec<crate::ir::Action>]) -> Result<()> {
    type Queues = HashMap<(usize, usize), Vec<Message>>;
    let (mut sent, mut received): (Queues, Queues) = (HashMap::new(), HashMap::new());
    for program in programs {
        for op in program.iter().flat_map(|a| a.ops()) {
            let Some(m) = schedule.message(op) else {
                continue;
            };
            let side = match op.kind {
                OpKind::SendF | OpKind::SendB => &mut sent,
                _ => &mut received,
            };
            side.entry((m.src, m.dst)).or_default().push(m);
        }
    }
    let mut pairs: Vec<(usize, usize)> = sent.keys().chain(received.keys()).copied().collect();
    pairs.sort_unstable();
    pairs.dedup();
    let empty = Vec::new();
    for (src, dst) in pairs {
        let s = sent.get(&(src, dst)).unwrap_or(&empty);
        let r = received.get(&(src, dst)).unwrap_or(&empty);
        let at = (0..s.len().max(r.len())).find(|&k| s.get(k) != r.get(k));
        if let Some(position) = at {
            let text = |m: Option<&Message>| m.map_or("nothing".to_string(), |m| m.to_string());
            return Err(Error::MessageOrder {
                src,
                dst,
                position,
                sent: text(s.get(position)),
                received: text(r.get(position)),
            });
        }
    }
    Ok(())
}

/// Shape `[rows, hidden]` of every pipeline message of `plan`: one
/// micro-batch's hidden states (or their gradient) between two stages —
/// the plan's tokens per micro-batch (`micro_batch_size · seq_len / cp`),
/// divided by `tp` when sequence parallelism shards the sequence, by `d_model`.
pub fn boundary_shape(plan: &Plan) -> [usize; 2] {
    let par = &plan.parallel;
    let mut rows = plan.batch.tokens_per_micro_batch;
    if par.sp {
        rows /= par.tp.max(1);
    }
    [rows, plan.model.d_model]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Action;
    use crate::maps::{Chain, StageMap};

    fn ops(text: &[&str]) -> Vec<Action> {
        text.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn messages_name_peers_and_payloads() {
        // ZBV-like V map on 2 ranks: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2.
        let s = Schedule::from_compute_only("", StageMap::v_shape(2), vec![Chain::linear(4, 2)])
            .unwrap();
        let m = s.message("3SEND_B1".parse().unwrap()).unwrap();
        assert_eq!(
            (m.src, m.dst, m.payload, m.to_stage),
            (0, 1, Payload::Gradient, 2)
        );
        let m = s.message("1RECV_F0".parse().unwrap()).unwrap();
        assert_eq!(
            (m.src, m.dst, m.payload, m.from_stage),
            (0, 1, Payload::Activation, 0)
        );
        assert_eq!(s.message("0F0".parse().unwrap()), None);
        assert_eq!(s.peers(0), vec![1]);
        assert!(s.is_last_stage(3) && !s.is_last_stage(2));
    }

    #[test]
    fn swapped_receives_are_a_named_error() {
        let s = Schedule::from_compute_only("", StageMap::looped(2, 1), vec![Chain::linear(2, 2)])
            .unwrap();
        let good = [
            ops(&["0SEND_F0", "0SEND_F1"]),
            ops(&["1RECV_F0", "1RECV_F1"]),
        ];
        assert_eq!(check_message_order(&s, &good), Ok(()));
        let swapped = [
            ops(&["0SEND_F0", "0SEND_F1"]),
            ops(&["1RECV_F1", "1RECV_F0"]),
        ];
        let e = check_message_order(&s, &swapped).unwrap_err();
        assert!(
            matches!(
                e,
                Error::MessageOrder {
                    src: 0,
                    dst: 1,
                    position: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("microbatch 0"), "{e}");
    }
}
