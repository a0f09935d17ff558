//! The validator: per-stage counts and orderings, one rank per stage, then
//! the communication dry run ([`crate::comm_pass`]).
//!
//! Rules (spec "Validation"): for every stage of a chain with M microbatches,
//! F count = M; I count = W count; B + (I+W)/2 = M; every microbatch has
//! exactly one F, then exactly one B or one I followed by one W, in that
//! order on the stage's rank; each stage's ops run on the one rank the stage
//! map gives it.

use crate::comm_pass::{insert_send_recv, CommSchedule};
use crate::error::{Error, Result};
use crate::ir::OpKind;
use crate::schedule::{check_placement, Schedule, Topology};
use serde::Serialize;

/// Compute-op counts of one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StageCounts {
    /// Forwards.
    pub f: usize,
    /// Backwards for input.
    pub i: usize,
    /// Backwards for weights.
    pub w: usize,
    /// Full backwards.
    pub b: usize,
}

/// Counts F/I/W/B per stage (index = stage).
pub fn stage_counts(schedule: &Schedule) -> Vec<StageCounts> {
    let mut counts = vec![StageCounts::default(); schedule.stage_map.stages()];
    for r in 0..schedule.ranks() {
        for op in schedule.ops_of(r) {
            let Some(c) = counts.get_mut(op.stage) else {
                continue;
            };
            match op.kind {
                OpKind::F => c.f += 1,
                OpKind::I => c.i += 1,
                OpKind::W => c.w += 1,
                OpKind::B => c.b += 1,
                _ => {}
            }
        }
    }
    counts
}

/// Checks `schedule` completely and returns it with SEND/RECV inserted.
pub fn validate(schedule: &Schedule) -> Result<CommSchedule> {
    check_placement(schedule)?;
    let topo = Topology::new(schedule);
    let stages = schedule.stage_map.stages();
    // Every op names a stage of some chain, and a microbatch of that chain.
    for (rank, program) in schedule.programs.iter().enumerate() {
        for action in program.iter().flatten() {
            for op in action.ops() {
                let Some(Some(pos)) = topo.pos.get(op.stage) else {
                    return Err(Error::UnknownStage {
                        rank,
                        action: action.to_string(),
                        stage: op.stage,
                        stages,
                    });
                };
                let in_range = op
                    .microbatch
                    .is_some_and(|mb| pos.microbatches.contains(&mb));
                if op.kind.is_compute() && !in_range {
                    return Err(Error::BadMicrobatch {
                        rank,
                        action: action.to_string(),
                        stage: op.stage,
                        lo: pos.microbatches.start,
                        hi: pos.microbatches.end,
                    });
                }
            }
        }
    }
    // Per-stage counts.
    for (stage, c) in stage_counts(schedule).into_iter().enumerate() {
        let Some(Some(pos)) = topo.pos.get(stage) else {
            continue;
        };
        let m = pos.microbatches.len();
        let rule = if c.f != m {
            Some("F count must equal the microbatches")
        } else if c.i != c.w {
            Some("I count must equal W count")
        } else if c.b + c.i != m {
            Some("B + (I+W)/2 must equal the microbatches")
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(Error::StageCount {
                stage,
                rule,
                f: c.f,
                i: c.i,
                w: c.w,
                b: c.b,
                m,
            });
        }
    }
    check_orderings(schedule, &topo)?;
    insert_send_recv(schedule)
}

/// Per (stage, microbatch): one F, then one B or one I, then (after I) one W.
fn check_orderings(schedule: &Schedule, topo: &Topology) -> Result<()> {
    // position[stage][mb] of F, I|B, W on the stage's rank (all on one rank).
    // Per microbatch: where (op index on the rank) its F, I|B and W ran.
    type Seen = [Option<(usize, OpKind)>; 3];
    let none: Seen = [None; 3];
    let mut seen: Vec<Vec<Seen>> = topo
        .pos
        .iter()
        .map(|p| {
            p.as_ref()
                .map(|p| vec![none; p.microbatches.end])
                .unwrap_or_default()
        })
        .collect();
    for r in 0..schedule.ranks() {
        for (at, op) in schedule.ops_of(r).enumerate() {
            let (Some(mb), true) = (op.microbatch, op.kind.is_compute()) else {
                continue;
            };
            let slot = match op.kind {
                OpKind::F => 0,
                OpKind::I | OpKind::B => 1,
                _ => 2,
            };
            let entry = &mut seen[op.stage][mb][slot];
            if let Some((_, prev)) = entry {
                let rule = format!("{op} repeats an earlier {}{}{mb}", op.stage, prev.name());
                return Err(Error::Ordering {
                    stage: op.stage,
                    microbatch: mb,
                    rule,
                });
            }
            *entry = Some((at, op.kind));
        }
    }
    for (stage, per_mb) in seen.iter().enumerate() {
        for (mb, [f, bwd, w]) in per_mb.iter().enumerate() {
            let Some(Some(pos)) = topo.pos.get(stage) else {
                continue;
            };
            if !pos.microbatches.contains(&mb) {
                continue;
            }
            let order = |rule: String| {
                Err(Error::Ordering {
                    stage,
                    microbatch: mb,
                    rule,
                })
            };
            match (f, bwd, w) {
                (Some((fa, _)), Some((ba, _)), _) if ba < fa => {
                    return order(format!("backward runs before its forward {stage}F{mb}"));
                }
                (_, Some((_, OpKind::B)), Some(_)) => {
                    return order("a full backward B already ran W; an extra W".to_string());
                }
                (_, Some((_, OpKind::I)), None) => {
                    return order(format!("{stage}I{mb} has no W"));
                }
                (_, Some((ia, OpKind::I)), Some((wa, _))) if wa < ia => {
                    return order(format!("{stage}W{mb} runs before {stage}I{mb}"));
                }
                (_, None, Some(_)) => return order(format!("{stage}W{mb} has no I")),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{Chain, StageMap};

    fn one_rank(text: &str, m: usize) -> Result<CommSchedule> {
        let s =
            Schedule::from_compute_only(text, StageMap::looped(1, 1), vec![Chain::linear(1, m)])?;
        validate(&s)
    }

    #[test]
    fn valid_single_stage_program_passes() {
        assert!(one_rank("0F0,0F1,0I0,0B1,0W0\n", 2).is_ok());
    }

    #[test]
    fn count_and_order_violations_are_named() {
        let e = one_rank("0F0,0B0\n", 2).unwrap_err();
        assert!(
            matches!(
                e,
                Error::StageCount {
                    stage: 0,
                    f: 1,
                    m: 2,
                    ..
                }
            ),
            "{e}"
        );
        let e = one_rank("0F0,0W0,0I0\n", 1).unwrap_err();
        assert!(e.to_string().contains("0W0 runs before 0I0"), "{e}");
        let e = one_rank("0B0,0F0\n", 1).unwrap_err();
        assert!(
            e.to_string().contains("backward runs before its forward"),
            "{e}"
        );
        let e = one_rank("0F0,0F0,0I0,0B0,0W0\n", 2).unwrap_err();
        assert!(
            matches!(e, Error::BadMicrobatch { .. } | Error::Ordering { .. }),
            "{e}"
        );
    }

    #[test]
    fn stage_on_wrong_rank_is_rejected() {
        let s = Schedule::from_compute_only(
            "0F0,1F0\n1B0,0B0\n",
            StageMap::looped(2, 1),
            vec![Chain::linear(2, 1)],
        )
        .unwrap();
        let e = validate(&s).unwrap_err();
        assert!(matches!(
            e,
            Error::StageOnWrongRank {
                stage: 1,
                expected_rank: 1,
                rank: 0,
                ..
            }
        ));
    }
}
