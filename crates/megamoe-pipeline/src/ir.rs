//! The action IR and PyTorch's compute-only text form.
//!
//! An [`Op`] is `(stage, kind, microbatch)`, printed `2F0`, `7I3`, `0W9`,
//! `4B6`, `1SEND_F3`, `2UNSHARD`. An [`Action`] is one op or an
//! `OVERLAP_F_B` unit of a forward and a backward of different stages, printed
//! `(0F7;7B3)OVERLAP_F_B`. A rank's program is a list of `Option<Action>`,
//! `None` being an idle tick (an empty CSV field). These strings are exactly
//! what `torch.distributed.pipelining`'s `_Action` prints and parses, so
//! schedules can be exchanged with PyTorch tooling.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OpKind {
    /// Forward.
    F,
    /// Backward for the input (activation gradient only).
    I,
    /// Backward for the weights (consumes what I left).
    W,
    /// Full backward (I and W run together).
    B,
    /// Send the forward output to the next stage's rank.
    SendF,
    /// Receive the forward input from the previous stage's rank.
    RecvF,
    /// Send the input gradient to the previous stage's rank.
    SendB,
    /// Receive the output gradient from the next stage's rank.
    RecvB,
    /// FSDP: gather the stage's parameters.
    Unshard,
    /// FSDP: free the gathered parameters.
    Reshard,
    /// Reduce the stage's gradients across data-parallel ranks.
    ReduceGrad,
}

impl OpKind {
    /// The PyTorch name (`F`, `SEND_F`, `REDUCE_GRAD`, ...).
    pub fn name(self) -> &'static str {
        match self {
            OpKind::F => "F",
            OpKind::I => "I",
            OpKind::W => "W",
            OpKind::B => "B",
            OpKind::SendF => "SEND_F",
            OpKind::RecvF => "RECV_F",
            OpKind::SendB => "SEND_B",
            OpKind::RecvB => "RECV_B",
            OpKind::Unshard => "UNSHARD",
            OpKind::Reshard => "RESHARD",
            OpKind::ReduceGrad => "REDUCE_GRAD",
        }
    }

    /// Compute kinds (F, I, W, B) as opposed to communication and FSDP ops.
    pub fn is_compute(self) -> bool {
        matches!(self, OpKind::F | OpKind::I | OpKind::W | OpKind::B)
    }

    /// Kinds that carry a microbatch index in the text form.
    fn has_microbatch(self) -> bool {
        !matches!(self, OpKind::Unshard | OpKind::Reshard | OpKind::ReduceGrad)
    }

    // Longest names first so that `SEND_F` is not read as a stage followed by `S`...
    const PARSE_ORDER: [OpKind; 11] = [
        OpKind::ReduceGrad,
        OpKind::Unshard,
        OpKind::Reshard,
        OpKind::SendF,
        OpKind::RecvF,
        OpKind::SendB,
        OpKind::RecvB,
        OpKind::F,
        OpKind::I,
        OpKind::W,
        OpKind::B,
    ];
}

/// One pipeline op: `stage`, `kind`, `microbatch` (absent for FSDP ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Op {
    /// Global stage index.
    pub stage: usize,
    /// What it does.
    pub kind: OpKind,
    /// Microbatch index (`None` only for UNSHARD / RESHARD / REDUCE_GRAD).
    pub microbatch: Option<usize>,
}

impl Op {
    /// A compute or p2p op on `stage` for `microbatch`.
    pub fn new(stage: usize, kind: OpKind, microbatch: usize) -> Op {
        Op {
            stage,
            kind,
            microbatch: Some(microbatch),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.stage, self.kind.name())?;
        if let Some(mb) = self.microbatch {
            write!(f, "{mb}")?;
        }
        Ok(())
    }
}

impl FromStr for Op {
    type Err = Error;
    fn from_str(s: &str) -> Result<Op> {
        let bad = |reason| Error::ParseAction {
            text: s.to_string(),
            reason,
        };
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("must start with a stage number"));
        }
        let stage = t[..digits]
            .parse::<usize>()
            .map_err(|_| bad("stage number too large"))?;
        let rest = &t[digits..];
        let kind = OpKind::PARSE_ORDER
            .into_iter()
            .find(|k| rest.starts_with(k.name()))
            .ok_or(bad("expected F, I, W, B, SEND_F, RECV_F, SEND_B, RECV_B, UNSHARD, RESHARD or REDUCE_GRAD after the stage"))?;
        let mb_text = &rest[kind.name().len()..];
        let microbatch = if mb_text.is_empty() {
            if kind.has_microbatch() {
                return Err(bad("this kind needs a microbatch number"));
            }
            None
        } else {
            if !kind.has_microbatch() {
                return Err(bad("this kind takes no microbatch number"));
            }
            if !mb_text.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad("microbatch must be a number"));
            }
            Some(
                mb_text
                    .parse::<usize>()
                    .map_err(|_| bad("microbatch number too large"))?,
            )
        };
        Ok(Op {
            stage,
            kind,
            microbatch,
        })
    }
}

/// One entry of a rank's program: a single op, or an overlapped F and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// One op.
    Op(Op),
    /// A forward and a backward (B or I) of different stages issued as one
    /// overlapped unit (DualPipe's `_forward_backward_chunk`).
    OverlapFB {
        /// The forward.
        f: Op,
        /// The backward.
        b: Op,
    },
}

impl Action {
    /// The ops of this action, forward first.
    pub fn ops(&self) -> impl Iterator<Item = Op> {
        let (a, b) = match *self {
            Action::Op(op) => (op, None),
            Action::OverlapFB { f, b } => (f, Some(b)),
        };
        std::iter::once(a).chain(b)
    }
}

impl From<Op> for Action {
    fn from(op: Op) -> Action {
        Action::Op(op)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Op(op) => write!(f, "{op}"),
            Action::OverlapFB { f: fwd, b } => write!(f, "({fwd};{b})OVERLAP_F_B"),
        }
    }
}

impl FromStr for Action {
    type Err = Error;
    fn from_str(s: &str) -> Result<Action> {
        let t = s.trim();
        let Some(inner) = t.strip_prefix('(') else {
            return Ok(Action::Op(t.parse()?));
        };
        let bad = |reason| Error::ParseAction {
            text: s.to_string(),
            reason,
        };
        let inner = inner
            .strip_suffix(")OVERLAP_F_B")
            .ok_or(bad("a group must end in )OVERLAP_F_B"))?;
        let (a, b) = inner
            .split_once(';')
            .ok_or(bad("OVERLAP_F_B needs two actions: (F;B)"))?;
        let (f, b): (Op, Op) = (a.parse()?, b.parse()?);
        if f.kind != OpKind::F || !matches!(b.kind, OpKind::B | OpKind::I) {
            return Err(bad(
                "OVERLAP_F_B must hold a forward then a backward (B or I)",
            ));
        }
        Ok(Action::OverlapFB { f, b })
    }
}

/// Prints per-rank programs in PyTorch's compute-only CSV form: one line per
/// rank, actions separated by commas, an empty field for an idle tick.
pub fn print_compute_only(ranks: &[Vec<Option<Action>>]) -> String {
    let mut out = String::new();
    for program in ranks {
        let fields: Vec<String> = program
            .iter()
            .map(|a| a.map(|a| a.to_string()).unwrap_or_default())
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// Parses the compute-only CSV form (one line per rank; empty field = idle).
/// A trailing newline is allowed; every other line is a rank, even if empty.
pub fn parse_compute_only(text: &str) -> Result<Vec<Vec<Option<Action>>>> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    text.split('\n')
        .map(|line| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                return Ok(Vec::new());
            }
            line.split(',')
                .map(|field| {
                    if field.trim().is_empty() {
                        Ok(None)
                    } else {
                        field.parse().map(Some)
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_text_round_trips_for_every_kind() {
        for s in [
            "2F0",
            "7I3",
            "0W9",
            "4B6",
            "1SEND_F3",
            "3RECV_F12",
            "0SEND_B1",
            "5RECV_B0",
        ] {
            assert_eq!(s.parse::<Op>().unwrap().to_string(), s);
        }
        for s in ["2UNSHARD", "0RESHARD", "11REDUCE_GRAD"] {
            let op: Op = s.parse().unwrap();
            assert_eq!(op.microbatch, None);
            assert_eq!(op.to_string(), s);
        }
        assert_eq!("12B34".parse::<Op>().unwrap(), Op::new(12, OpKind::B, 34));
    }

    #[test]
    fn overlap_text_round_trips() {
        let a: Action = "(0F7;7B3)OVERLAP_F_B".parse().unwrap();
        assert_eq!(
            a,
            Action::OverlapFB {
                f: Op::new(0, OpKind::F, 7),
                b: Op::new(7, OpKind::B, 3)
            }
        );
        assert_eq!(a.to_string(), "(0F7;7B3)OVERLAP_F_B");
    }

    #[test]
    fn malformed_actions_are_named_errors() {
        for s in [
            "F0",
            "0X1",
            "0F",
            "0Fx",
            "0UNSHARD3",
            "(0F1;1B0)",
            "(0B1;1F0)OVERLAP_F_B",
        ] {
            let e = s.parse::<Action>().unwrap_err();
            assert!(matches!(e, Error::ParseAction { .. }), "{s}: {e}");
            assert!(e.to_string().contains(s), "{e}");
        }
    }

    #[test]
    fn compute_only_csv_keeps_idle_ticks() {
        let text = "0F0,,0B0\n,1F0,1B0\n";
        let ranks = parse_compute_only(text).unwrap();
        assert_eq!(ranks.len(), 2);
        assert_eq!(ranks[0][1], None);
        assert_eq!(ranks[1][0], None);
        assert_eq!(ranks[1][2], Some(Action::Op(Op::new(1, OpKind::B, 0))));
        assert_eq!(print_compute_only(&ranks), text);
    }
}
