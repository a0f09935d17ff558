//! Pipeline × tensor-parallel layout invariance: with `parallel.pp` and `parallel.tp` the
//! tp ranks of each stage hold their slices of its attention and dense / shared-expert
//! matrices; 10 steps give one rank's per-step losses (f32, ≤ 1e-5 relative) and gradient
//! norms (≤ 1e-4), with AdamW and Muon, under 1F1B and DualPipeV, also times dp; a
//! checkpoint written under pp2 × tp2 continues under one rank (and one rank's checkpoint
//! under pp2 × tp2) with the uninterrupted losses; with `parallel.fsdp = 2` too. With
//! `parallel.sp` (sequence parallelism) the stage boundaries carry each tp rank's sequence
//! shard of the hidden state and its gradient.
#![allow(clippy::unwrap_used)]

mod common;

use common::layout::{
    assert_matches_one_rank, curve, data, max_rel_diff, pipeline_one_rank, pipeline_raw,
    pipeline_sets, resume_both_ways, Mesh, STEPS,
};
use common::TestDir;
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{Error, StepMetrics, Trainer, TrainerOptions};

const MESHES: [Mesh; 3] = [
    Mesh::pp(2, 1, 1, "1f1b", 0).with_tp(2),
    Mesh::pp(2, 1, 1, "dualpipev", 0).with_tp(2),
    Mesh::pp(2, 2, 1, "1f1b", 0).with_tp(2),
];

#[test]
fn pipeline_with_tp_matches_one_rank_with_adamw() {
    assert_matches_one_rank("adamw", &MESHES);
}

#[test]
fn pipeline_with_tp_matches_one_rank_with_muon() {
    assert_matches_one_rank("muon", &MESHES);
}

/// pp × tp × sp: the p2p payloads are the tp ranks' sequence shards; the zero-bubble
/// schedule runs the final norm's gradient sum in its deferred weight pass; also with
/// fsdp 3 inside the stages. Every rank's curve against one rank's.
#[test]
fn pipeline_with_tp_and_sequence_parallel_matches_one_rank() {
    let meshes = [
        Mesh::pp(2, 1, 1, "1f1b", 0).with_tp(2),
        Mesh::pp(2, 1, 1, "zb-h1", 0).with_tp(2),
        Mesh::pp(2, 1, 1, "dualpipev", 0).with_tp(2),
        Mesh::pp(2, 2, 1, "1f1b", 0).with_tp(2),
        // with ZeRO-3 inside the stages: rows of each TP slice gathered per block
        Mesh::pp(2, 2, 1, "zb-h1", 3).with_tp(2),
    ];
    for optim in ["adamw", "muon"] {
        let want = pipeline_one_rank(optim);
        for mesh in &meshes {
            let mut sets = pipeline_sets(optim);
            sets.extend(mesh.sets());
            sets.push("parallel.sp=true".to_string());
            let raw = pipeline_raw(&sets);
            let curves = run_thread_ranks(mesh.world(), |world| -> Result<_, Error> {
                let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
                let m: Vec<StepMetrics> = (0..STEPS).map(|_| t.step()).collect::<Result<_, _>>()?;
                Ok(curve(&m))
            })
            .unwrap();
            for (r, got) in curves.iter().enumerate() {
                let (loss, norm) = max_rel_diff(got, &want);
                let label = format!("{optim} {} sp rank {r}", mesh.label());
                eprintln!("{label}: max rel diff loss {loss:.2e}, grad norm {norm:.2e}");
                assert!(
                    loss <= 1e-5 && norm <= 1e-4,
                    "{label}: {got:?} vs one rank {want:?}"
                );
            }
        }
    }
}

#[test]
fn tp_pipeline_checkpoints_resume_across_layouts() {
    let dir = TestDir::new("pp-tp");
    resume_both_ways(&Mesh::pp(2, 1, 1, "dualpipev", 0).with_tp(2), dir.path());
}

/// pp × tp × fsdp 2: each stage's TP slices' rows sharded over its data ranks (Muon
/// gathers rows, then slices); a checkpoint of it continues under one rank and one rank's
/// under it.
#[test]
fn pipeline_with_tp_and_fsdp_matches_one_rank() {
    let mesh = Mesh::pp(2, 2, 1, "1f1b", 2).with_tp(2);
    for optim in ["adamw", "muon"] {
        assert_matches_one_rank(optim, &[mesh]);
    }
    let dir = TestDir::new("pp-tp-fsdp");
    resume_both_ways(&mesh, dir.path());
}

/// Each pipeline rank's parameters under pp2 × tp2: both tp ranks of a stage hold the same
/// number of elements, fewer than the stage's whole tensors under pp2 alone.
#[test]
fn tp_ranks_of_a_stage_hold_slices() {
    let held = |tp: usize| -> Vec<(usize, usize, u64)> {
        Mesh::pp(2, 1, 1, "1f1b", 0)
            .with_tp(tp)
            .per_rank("adamw", |t| {
                let c = t.parallel().unwrap().coords();
                (c.pp, c.tp, t.pipeline().unwrap().param_elements())
            })
    };
    let (whole, sliced) = (held(1), held(2));
    for pp in 0..2 {
        let full = whole.iter().find(|r| r.0 == pp).unwrap().2;
        let of = |tp: usize| sliced.iter().find(|r| r.0 == pp && r.1 == tp).unwrap().2;
        assert_eq!(of(0), of(1), "pp {pp}");
        assert!(of(0) < full, "pp {pp}: {} of {full}", of(0));
    }
}
