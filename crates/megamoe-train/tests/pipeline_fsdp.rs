//! Pipeline × FSDP layout invariance: with `parallel.pp` and `parallel.fsdp` 1 or 2 each
//! stage's optimizer state and gradients are sharded over the stage's data-parallel ranks
//! (dense rows over dp·ep, expert rows over dp); 10 steps give one rank's per-step losses
//! (f32, ≤ 1e-5 relative) and gradient norms (≤ 1e-4), with AdamW and Muon, under 1F1B and
//! DualPipeV, and a checkpoint written under pp2 × dp2 fsdp 2 continues under one rank
//! (and one rank's checkpoint under pp2 × dp2 fsdp 2) with the uninterrupted losses.
//! `parallel.fsdp = 3` with pp: `pipeline_zero3.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use common::layout::{assert_matches_one_rank, at_rank, resume_both_ways, Mesh};
use common::TestDir;

const MESHES: [Mesh; 3] = [
    Mesh::pp(2, 2, 1, "1f1b", 2),
    Mesh::pp(2, 2, 1, "dualpipev", 2),
    Mesh::pp(2, 2, 2, "1f1b", 2),
];

#[test]
fn pipeline_with_fsdp_matches_one_rank_with_adamw() {
    assert_matches_one_rank("adamw", &MESHES);
}

#[test]
fn pipeline_with_fsdp_matches_one_rank_with_muon() {
    assert_matches_one_rank("muon", &MESHES);
}

#[test]
fn fsdp_pipeline_checkpoints_resume_across_layouts() {
    let dir = TestDir::new("pp-fsdp");
    resume_both_ways(&Mesh::pp(2, 2, 1, "1f1b", 2), dir.path());
}

/// Each pipeline rank's optimizer state under pp2 × dp2: with fsdp 2 the two data ranks
/// of a stage hold disjoint rows that add up to the state one of them holds without fsdp.
#[test]
fn fsdp_shards_each_stage_s_optimizer_state_over_its_data_ranks() {
    let state = |fsdp: usize| -> Vec<(usize, usize, u64)> {
        Mesh::pp(2, 2, 1, "1f1b", fsdp).per_rank("muon", |t| {
            let c = t.parallel().unwrap().coords();
            (c.pp, c.dp, t.pipeline().unwrap().optimizer_state_elements())
        })
    };
    let (whole, rows) = (state(0), state(2));
    for pp in 0..2 {
        let of = |list: &[(usize, usize, u64)], dp: usize| at_rank(list, pp, dp);
        let full = of(&whole, 0);
        assert_eq!(of(&whole, 1), full, "pp {pp}: replicated without fsdp");
        let (a, b) = (of(&rows, 0), of(&rows, 1));
        assert_eq!(a + b, full, "pp {pp}: rows {a} + {b} vs whole {full}");
        assert!(a < full && b < full && b > 0, "pp {pp}: {a}, {b} of {full}");
    }
}
