//! Pipeline × ZeRO-3 layout invariance (`parallel.fsdp = 3` with `parallel.pp`): each
//! pipeline rank keeps only its rows of its stages' parameters between steps, gathers a
//! block's rows over the stage's data ranks around its forward and its backward for the
//! input (the weight-gradient pass reads no weights), reduce-scatters the gradients and
//! updates its rows. 10 steps give one rank's per-step losses (f32, ≤ 1e-5 relative) and
//! gradient norms (≤ 1e-4) under dp2 × pp2 with every schedule (AdamW), with 1F1B, ZB-H1
//! and DualPipeV (Muon), with expert parallelism inside the stages and with tensor
//! parallelism (pp2 × tp2 × dp2); a checkpoint written under dp2 × pp2 fsdp 3 continues
//! under one rank and one rank's under it; eval and sampling gather like a forward.
#![allow(clippy::unwrap_used)]

mod common;

use common::layout::{
    assert_matches_one_rank, at_rank, data, pipeline_raw, pipeline_sets, resume_both_ways, Mesh,
    MICRO,
};
use common::TestDir;
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{Trainer, TrainerOptions};

/// dp2 × pp2 fsdp 3 under `schedule`.
const fn zero3(schedule: &'static str) -> Mesh {
    Mesh::pp(2, 2, 1, schedule, 3)
}

#[test]
fn every_schedule_with_fsdp3_matches_one_rank_with_adamw() {
    let schedules = [
        "gpipe",
        "1f1b",
        "interleaved",
        "zb-h1",
        "zbv",
        "dualpipe",
        "dualpipev",
    ];
    let mut meshes: Vec<Mesh> = schedules.iter().map(|s| zero3(s)).collect();
    meshes.push(Mesh::pp(2, 2, 2, "zb-h1", 3));
    assert_matches_one_rank("adamw", &meshes);
}

#[test]
fn pipeline_with_fsdp3_matches_one_rank_with_muon() {
    assert_matches_one_rank(
        "muon",
        &[
            zero3("1f1b"),
            zero3("zb-h1"),
            zero3("dualpipev"),
            Mesh::pp(2, 2, 2, "1f1b", 3),
        ],
    );
}

/// pp2 × tp2 × dp2 fsdp 3: each stage's TP slices' rows gathered per block over its data
/// ranks (Muon gathers rows, then slices).
#[test]
fn pipeline_with_tp_and_fsdp3_matches_one_rank() {
    let meshes = [zero3("1f1b").with_tp(2), zero3("zb-h1").with_tp(2)];
    assert_matches_one_rank("adamw", &meshes);
    assert_matches_one_rank("muon", &meshes[..1]);
}

#[test]
fn fsdp3_pipeline_checkpoints_resume_across_layouts() {
    let dir = TestDir::new("pp-zero3");
    resume_both_ways(&zero3("dualpipev"), dir.path());
}

/// Under dp2 × pp2 fsdp 3 each rank's stage parameters are its rows: the two data ranks of
/// a stage hold disjoint rows adding up to the stage's tensors (what a rank holds with
/// fsdp 2), each well under them, before and after steps.
#[test]
fn fsdp3_pipeline_ranks_hold_their_rows_between_steps() {
    let held = |fsdp: usize, steps: usize| -> Vec<(usize, usize, u64)> {
        let raw = Mesh {
            fsdp,
            ..zero3("1f1b")
        }
        .raw("adamw");
        run_thread_ranks(4, |w| {
            let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), w)?;
            for _ in 0..steps {
                t.step()?;
            }
            let c = t.parallel().unwrap().coords();
            Ok((c.pp, c.dp, t.pipeline().unwrap().param_elements()))
        })
        .unwrap()
    };
    let whole = held(2, 0);
    for steps in [0, 2] {
        let rows = held(3, steps);
        for pp in 0..2 {
            let of = |list: &[(usize, usize, u64)], dp: usize| at_rank(list, pp, dp);
            let full = of(&whole, 0);
            let (a, b) = (of(&rows, 0), of(&rows, 1));
            assert_eq!(
                a + b,
                full,
                "pp {pp} after {steps} steps: rows {a} + {b} vs {full}"
            );
            assert!(
                a * 10 <= full * 6 && b * 10 <= full * 6,
                "pp {pp} after {steps} steps: {a}, {b} of {full}"
            );
        }
    }
}

/// Evaluation and sampling on dp2 × pp2 fsdp 3 ranks (the forward-only pass gathers the
/// rows like a forward): one rank's eval loss and sampled text.
#[test]
fn eval_and_sampling_under_pp_with_fsdp3_match_one_rank() {
    let mut sets = pipeline_sets("adamw");
    sets.push("train.eval_batches=2".to_string());
    let go = |t: &mut Trainer| -> megamoe_train::Result<(f64, String, f64)> {
        let at_init = t.evaluate()?.loss;
        let text = t.sample("The quick brown ", 12)?.text;
        t.step()?;
        t.step()?;
        Ok((at_init, text, t.evaluate()?.loss))
    };
    let mut one_sets = sets.clone();
    one_sets.push(format!("parallel.microbatches={MICRO}"));
    let mut one =
        Trainer::new(&pipeline_raw(&one_sets), data(), TrainerOptions::default()).unwrap();
    let want = go(&mut one).unwrap();
    let mesh = zero3("dualpipev");
    sets.extend(mesh.sets());
    let raw = pipeline_raw(&sets);
    let got = run_thread_ranks(mesh.world(), |w| {
        go(&mut Trainer::new_rank(
            &raw,
            data(),
            TrainerOptions::default(),
            w,
        )?)
    })
    .unwrap();
    for (r, g) in got.iter().enumerate() {
        assert_eq!(g, &got[0], "rank {r} reports rank 0's eval and sample");
    }
    let (at_init, text, after) = &got[0];
    assert_eq!(*at_init, want.0, "eval at step 0 (one rank's parameters)");
    assert_eq!(text, &want.1, "sampled text");
    assert!(
        ((after - want.2) / want.2).abs() <= 1e-5,
        "eval after 2 steps {after} vs {}",
        want.2
    );
}
