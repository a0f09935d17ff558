//! Property tests: for random valid (kind, P, M), generated schedules
//! validate, every microbatch's F precedes its I/B which precedes its W on
//! each stage (checked here independently of the validator), the text form
//! round-trips, and the communication pass terminates with matched pairs.

#![allow(clippy::unwrap_used)] // test helpers may unwrap, as tests may

use megamoe_pipeline::{
    generate, insert_send_recv, validate, Action, OpKind, PipelineShape, Schedule,
};
use megamoe_plan::ScheduleKind;
use proptest::prelude::*;
use std::collections::HashMap;

/// A valid (kind, shape) drawn from each kind's preconditions.
fn valid_case() -> impl Strategy<Value = (ScheduleKind, PipelineShape)> {
    (0usize..7, 1usize..7, 0usize..12, 2usize..4).prop_map(|(k, p, extra, v)| {
        let kind = ScheduleKind::ALL[k];
        let (ranks, microbatches) = match kind {
            ScheduleKind::GPipe | ScheduleKind::Zbv => (p, 1 + extra),
            ScheduleKind::OneFOneB | ScheduleKind::ZbH1 => (p, p + extra),
            // m % P == 0 and m·v > 2(P−1) + (v−1)P  ⇐  m >= 2P.
            ScheduleKind::Interleaved => (p, p * (2 + extra % 3)),
            ScheduleKind::DualPipe => {
                let p = 2 * p.div_ceil(2);
                (p, 2 * p + 2 * (extra / 2))
            }
            ScheduleKind::DualPipeV => (p, 2 * p + extra),
        };
        (
            kind,
            PipelineShape {
                ranks,
                microbatches,
                vpp: v,
            },
        )
    })
}

/// Position of each (stage, kind, mb) in its rank's op order.
fn positions(s: &Schedule) -> HashMap<(usize, OpKind, usize), usize> {
    let mut at = HashMap::new();
    for r in 0..s.ranks() {
        for (i, op) in s.ops_of(r).enumerate() {
            if let Some(mb) = op.microbatch {
                assert!(
                    at.insert((op.stage, op.kind, mb), i).is_none(),
                    "duplicate {op}"
                );
            }
        }
    }
    at
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn generated_schedules_validate((kind, shape) in valid_case()) {
        let s = generate(kind, shape).unwrap();
        prop_assert_eq!(s.ranks(), shape.ranks);
        let comm = validate(&s);
        prop_assert!(comm.is_ok(), "{kind} {shape:?}: {}", comm.unwrap_err());
    }

    #[test]
    fn forward_precedes_backward_precedes_weight((kind, shape) in valid_case()) {
        let s = generate(kind, shape).unwrap();
        let at = positions(&s);
        for chain in &s.chains {
            for &stage in &chain.stages {
                for mb in chain.microbatches.clone() {
                    let f = at[&(stage, OpKind::F, mb)];
                    match (at.get(&(stage, OpKind::B, mb)), at.get(&(stage, OpKind::I, mb))) {
                        (Some(&b), None) => {
                            prop_assert!(f < b);
                            prop_assert!(!at.contains_key(&(stage, OpKind::W, mb)));
                        }
                        (None, Some(&i)) => {
                            let w = at[&(stage, OpKind::W, mb)];
                            prop_assert!(f < i && i < w, "{kind}: {stage} mb {mb}");
                        }
                        other => prop_assert!(false, "{kind}: stage {stage} mb {mb}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn comm_pass_terminates_with_matched_pairs((kind, shape) in valid_case()) {
        let s = generate(kind, shape).unwrap();
        let c = insert_send_recv(&s).unwrap();
        let total: usize = s.programs.iter().map(|p| p.len()).sum();
        // Lockstep: at least one action per round, so rounds <= actions.
        prop_assert!(c.rounds <= total);
        let count = |k: OpKind| {
            c.programs.iter().flatten().flat_map(Action::ops).filter(|o| o.kind == k).count()
        };
        prop_assert_eq!(count(OpKind::SendF), count(OpKind::RecvF));
        prop_assert_eq!(count(OpKind::SendB), count(OpKind::RecvB));
    }

    #[test]
    fn compute_only_text_round_trips((kind, shape) in valid_case()) {
        let s = generate(kind, shape).unwrap();
        let back = Schedule::from_compute_only(&s.to_compute_only(), s.stage_map.clone(), s.chains.clone())
            .unwrap();
        prop_assert_eq!(back.programs, s.programs);
    }
}
