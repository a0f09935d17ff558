//! [`Schedule`]: per-rank programs plus the stage map and chains that give
//! them meaning, and the data dependencies between ops.

use crate::error::{Error, Result};
use crate::ir::{parse_compute_only, print_compute_only, Action, Op, OpKind};
use crate::maps::{Chain, StageMap};
use megamoe_plan::ScheduleKind;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// A pipeline schedule: for each rank, the ordered list of actions it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The generator that built it (`None` when parsed from text).
    pub kind: Option<ScheduleKind>,
    /// Which rank holds each stage.
    pub stage_map: StageMap,
    /// Forward paths and the microbatches taking each.
    pub chains: Vec<Chain>,
    /// `programs[rank]`: that rank's actions in issue order; `None` = idle tick.
    pub programs: Vec<Vec<Option<Action>>>,
}

impl Schedule {
    /// The programs in PyTorch's compute-only CSV form.
    pub fn to_compute_only(&self) -> String {
        print_compute_only(&self.programs)
    }

    /// Reads programs in the compute-only CSV form; `stage_map` and `chains`
    /// say what the stage numbers mean (the text does not carry them).
    pub fn from_compute_only(text: &str, stage_map: StageMap, chains: Vec<Chain>) -> Result<Self> {
        let mut programs = parse_compute_only(text)?;
        programs.resize(stage_map.ranks().max(programs.len()), Vec::new());
        Ok(Schedule {
            kind: None,
            stage_map,
            chains,
            programs,
        })
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.programs.len()
    }

    /// Total microbatches over all chains.
    pub fn microbatches(&self) -> usize {
        self.chains.iter().map(|c| c.microbatches.len()).sum()
    }

    /// Every op of `rank` in order, overlapped units split forward first.
    pub fn ops_of(&self, rank: usize) -> impl Iterator<Item = Op> + '_ {
        self.programs[rank].iter().flatten().flat_map(|a| a.ops())
    }
}

/// Where a stage sits in its chain.
#[derive(Debug, Clone)]
pub(crate) struct StagePos {
    pub prev: Option<usize>,
    pub next: Option<usize>,
    pub microbatches: Range<usize>,
}

/// What an op has produced, for dependency tracking: F's output, the input
/// gradient (I or B), and the weight gradient (W or B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Done {
    F,
    Grad,
    W,
}

/// `(stage, what, microbatch)`: one produced value.
pub(crate) type Event = (usize, Done, usize);

/// Stage positions of every stage of a schedule, from its chains.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub pos: Vec<Option<StagePos>>,
}

impl Topology {
    pub fn new(schedule: &Schedule) -> Topology {
        let mut pos = vec![None; schedule.stage_map.stages()];
        for chain in &schedule.chains {
            for (k, &s) in chain.stages.iter().enumerate() {
                if s >= pos.len() {
                    pos.resize(s + 1, None);
                }
                pos[s] = Some(StagePos {
                    prev: k.checked_sub(1).map(|j| chain.stages[j]),
                    next: chain.stages.get(k + 1).copied(),
                    microbatches: chain.microbatches.clone(),
                });
            }
        }
        Topology { pos }
    }

    /// What `op` needs before it can run (same or other rank). Non-compute ops need nothing.
    pub fn needs(&self, op: Op) -> Vec<Event> {
        let (Some(mb), Some(Some(p))) = (op.microbatch, self.pos.get(op.stage)) else {
            return Vec::new();
        };
        match op.kind {
            OpKind::F => p.prev.map(|s| vec![(s, Done::F, mb)]).unwrap_or_default(),
            OpKind::I | OpKind::B => {
                let mut v = vec![(op.stage, Done::F, mb)];
                v.extend(p.next.map(|s| (s, Done::Grad, mb)));
                v
            }
            OpKind::W => vec![(op.stage, Done::Grad, mb)],
            _ => Vec::new(),
        }
    }

    /// What `op` produces (B produces both the input and the weight gradient).
    pub fn produces(op: Op) -> Vec<Event> {
        let Some(mb) = op.microbatch else {
            return Vec::new();
        };
        match op.kind {
            OpKind::F => vec![(op.stage, Done::F, mb)],
            OpKind::I => vec![(op.stage, Done::Grad, mb)],
            OpKind::W => vec![(op.stage, Done::W, mb)],
            OpKind::B => vec![(op.stage, Done::Grad, mb), (op.stage, Done::W, mb)],
            _ => Vec::new(),
        }
    }
}

/// An op that would produce `e`, for messages ("waits for 3F2").
pub(crate) fn event_text(e: Event) -> String {
    let kind = match e.1 {
        Done::F => "F",
        Done::Grad => "I|B",
        Done::W => "W",
    };
    format!("{}{}{}", e.0, kind, e.2)
}

/// Checks every action's stage exists and runs on the rank that holds it.
pub(crate) fn check_placement(schedule: &Schedule) -> Result<()> {
    let stages = schedule.stage_map.stages();
    for (rank, program) in schedule.programs.iter().enumerate() {
        for action in program.iter().flatten() {
            for op in action.ops() {
                let Some(expected_rank) = schedule.stage_map.rank(op.stage) else {
                    return Err(Error::UnknownStage {
                        rank,
                        action: action.to_string(),
                        stage: op.stage,
                        stages,
                    });
                };
                if expected_rank != rank {
                    return Err(Error::StageOnWrongRank {
                        stage: op.stage,
                        expected_rank,
                        rank,
                        action: action.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}
