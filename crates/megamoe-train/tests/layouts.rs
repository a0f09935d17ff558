//! Layout invariance: a distributed run over thread ranks computes the same training as one
//! rank. The global batch and the micro-batch size are fixed; one rank runs every
//! micro-batch (`parallel.microbatches = dp·ep·m`), a layout gives each of its dp·ep data
//! ranks m of them. Per-micro-batch quantities (CE mean, aux, z, capacity) are then the
//! same, so the per-step losses agree up to float summation order: f32, ≤ 1e-5 relative,
//! for 10 steps, on every rank.
//!
//! The model has a dense layer and an MoE layer with a gated shared expert, aux and z
//! losses and the aux-loss-free expert bias; each layout runs with capacity off (dropless)
//! and on (capacity factor 1, assignments dropped), with AdamW and with Muon.
#![allow(clippy::unwrap_used)]

use megamoe_plan::RawConfig;
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{load_checkpoint, Error, Expected, NamedTensor, Trainer, TrainerOptions};

#[path = "common/layout.rs"]
mod layout;

use layout::{data, thread_ranks_checkpoint, BASE, STEPS};

fn raw(sets: &[String]) -> RawConfig {
    RawConfig::from_toml_str_with_overrides(BASE, sets).unwrap()
}

fn one_rank(sets: &[String], micro: usize) -> Vec<(f64, f64)> {
    layout::one_rank(raw, sets, micro)
}

/// Every rank's curve under `parallel.dp = dp, parallel.ep = ep` (m micro-batches each).
fn ranks(sets: &[String], dp: usize, ep: usize, m: usize) -> Vec<Vec<(f64, f64)>> {
    layout::ranks(raw, sets, (dp, ep), m)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// Checks a layout against one rank; returns the max relative loss difference.
fn check(label: &str, sets: &[String], dp: usize, ep: usize) -> f64 {
    let m = 1;
    let want = one_rank(sets, dp * ep * m);
    // the curve moves, so equal losses mean equal training, not a stuck model
    assert!(
        rel(want[STEPS - 1].0, want[0].0) > 1e-3,
        "{label}: loss did not move: {want:?}"
    );
    let got = ranks(sets, dp, ep, m);
    assert_eq!(got.len(), dp * ep);
    let mut worst = 0.0f64;
    for (r, curve) in got.iter().enumerate() {
        for (s, ((l, n), (wl, wn))) in curve.iter().zip(&want).enumerate() {
            let (el, en) = (rel(*l, *wl), rel(*n, *wn));
            assert!(
                el <= 1e-5,
                "{label}: rank {r} step {}: loss {l} vs one rank {wl} (rel {el:e})",
                s + 1
            );
            assert!(
                en <= 1e-4,
                "{label}: rank {r} step {}: grad norm {n} vs one rank {wn} (rel {en:e})",
                s + 1
            );
            worst = worst.max(el);
        }
    }
    eprintln!("{label}: max rel loss difference over {STEPS} steps: {worst:e}");
    worst
}

/// The config variants every layout runs: optimizer × capacity.
fn variants() -> Vec<(String, Vec<String>)> {
    variants_of(&["adamw", "muon"])
}

fn variants_of(optims: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for optim in optims {
        for (cap, sets) in [
            ("dropless", vec![]),
            ("capacity", vec!["moe.capacity_factor=1.0".to_string()]),
        ] {
            let mut s = sets.clone();
            s.push(format!("optim.name=\"{optim}\""));
            out.push((format!("{optim}/{cap}"), s));
        }
    }
    out
}

fn check_layout(dp: usize, ep: usize) {
    for (label, sets) in variants() {
        check(&format!("dp{dp}xep{ep} {label}"), &sets, dp, ep);
    }
}

#[test]
fn dp2_matches_one_rank() {
    check_layout(2, 1);
}

#[test]
fn ep2_matches_one_rank() {
    check_layout(1, 2);
}

#[test]
fn dp2_ep2_matches_one_rank() {
    check_layout(2, 2);
}

/// Sharded optimizer state and gradients (ZeRO-1/2): reduce-scatter, update of the rank's
/// rows (AdamW elementwise; Muon: the matrix gathered for NS5, expert banks whole per
/// rank), all-gather.
fn check_sharded(dp: usize, ep: usize, level: usize) {
    for (label, mut sets) in variants() {
        sets.push(format!("parallel.fsdp={level}"));
        check(&format!("dp{dp}xep{ep} fsdp{level} {label}"), &sets, dp, ep);
    }
}

#[test]
fn dp2_fsdp2_matches_one_rank() {
    check_sharded(2, 1, 2);
}

#[test]
fn dp4_fsdp1_and_fsdp2_match_one_rank() {
    check_sharded(4, 1, 1);
    check_sharded(4, 1, 2);
}

#[test]
fn dp2_ep2_fsdp2_matches_one_rank() {
    check_sharded(2, 2, 2);
}

/// Parameters sharded between steps (ZeRO-3): each block gathered around its forward and
/// its backward, gradients reduce-scattered, the rows updated in place.
#[test]
fn dp2_and_dp4_fsdp3_match_one_rank() {
    check_sharded(2, 1, 3);
    check_sharded(4, 1, 3);
}

#[test]
fn dp2_ep2_fsdp3_matches_one_rank() {
    check_sharded(2, 2, 3);
}

/// Global gradient clipping across ranks with a clip that bites at every step: the norm
/// counts replicated gradients once and sums sharded rows and expert shards once over
/// their groups, so the pre-clip norm (compared at 1e-4) and the clipped step (the losses)
/// equal one rank's, replicated and sharded, AdamW and Muon.
#[test]
fn a_biting_grad_clip_matches_one_rank() {
    let clip = 0.05;
    for (dp, ep, fsdp) in [(2, 1, 2), (2, 2, 2), (2, 2, 0), (2, 1, 3)] {
        for optim in ["adamw", "muon"] {
            let sets = vec![
                format!("optim.grad_clip={clip}"),
                format!("optim.name=\"{optim}\""),
                format!("parallel.fsdp={fsdp}"),
            ];
            let one: Vec<String> = sets[..2].to_vec();
            let want = one_rank(&one, dp * ep);
            assert!(
                want.iter().all(|&(_, norm)| norm > 2.0 * clip),
                "the clip must bite at every step: {want:?}"
            );
            check(
                &format!("dp{dp}xep{ep} fsdp{fsdp} {optim} clip {clip}"),
                &sets,
                dp,
                ep,
            );
        }
    }
}

/// The gradient reduce overlapped with the backward (each block's gradients all-reduced as
/// soon as the backward of the step's last micro-batch has finished them) gives the same
/// bits as reducing every gradient after the backward.
#[test]
fn overlapped_grad_reduce_gives_the_same_bits() {
    let steps = 4;
    for (dp, ep) in [(2, 1), (2, 2)] {
        let raw = raw(&[
            format!("parallel.dp={dp}"),
            format!("parallel.ep={ep}"),
            "parallel.microbatches=2".to_string(),
        ]);
        let run = |overlap: bool| {
            run_thread_ranks(dp * ep, |world| -> Result<_, Error> {
                let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
                t.parallel().unwrap().set_grad_overlap(overlap);
                let mut bits = Vec::new();
                for _ in 0..steps {
                    let m = t.step()?;
                    bits.push((m.loss.total.to_bits(), m.grad_norm.to_bits()));
                }
                Ok((bits, t.parallel().unwrap().overlapped_reduces()))
            })
            .unwrap()
        };
        let (on, off) = (run(true), run(false));
        for r in 0..dp * ep {
            assert_eq!(on[r].0, off[r].0, "dp{dp}xep{ep} rank {r}: same bits");
            // Per step: the dense layer, and the MoE layer's dense and expert tensors.
            assert_eq!(
                on[r].1,
                3 * steps,
                "dp{dp}xep{ep} rank {r}: started in backward"
            );
            assert_eq!(off[r].1, 0);
        }
    }
}

#[test]
fn unsupported_layouts_are_refused_by_name() {
    // Pipeline stages combined with context parallelism (fsdp 1, 2 and 3 run with pp:
    // tests/pipeline_fsdp.rs, tests/pipeline_zero3.rs).
    let sets = ["parallel.pp=2", "parallel.dp=2", "parallel.cp=2"].map(String::from);
    let raw = raw(&sets);
    let failures = run_thread_ranks(8, |world| -> Result<(), Error> {
        Trainer::new_rank(&raw, data(), TrainerOptions::default(), world).map(|_| ())
    })
    .unwrap_err();
    assert!(
        failures.first.1.starts_with("parallel.pp="),
        "{sets:?}: {failures}"
    );
}

#[test]
fn a_failed_rank_stops_every_other_rank_naming_it() {
    let raw = raw(&["parallel.dp=2".to_string(), "parallel.ep=2".to_string()]);
    let failures = run_thread_ranks(4, |world| -> Result<(), Error> {
        let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
        let fault = Some((2, 3));
        for _ in 0..STEPS {
            megamoe_train::distributed::check_rank_fault(&t, fault)?;
            t.step()?;
        }
        Ok(())
    })
    .unwrap_err();
    assert_eq!(failures.first.0, 2, "{failures}");
    assert_eq!(failures.failures.len(), 4, "every rank exits with an error");
    for (rank, msg) in &failures.failures {
        if *rank != 2 {
            assert!(msg.contains("rank 2 failed"), "rank {rank}: {msg}");
        }
    }
}

/// A checkpoint written by rank 0 of dp2×ep2 (expert banks and their optimizer state
/// gathered over the EP group) holds the tensors of the one-rank checkpoint after the same
/// steps: same names and shapes, values equal up to summation order (≤ 1e-4 of the
/// tensor's largest value: gradient-derived state carries the f32 reduction-order
/// differences of three steps).
#[test]
fn a_dp2_ep2_checkpoint_is_the_one_rank_checkpoint() {
    checkpoint_matches_one_rank("ep", &["optim.name=\"muon\"", "parallel.ep=2"]);
}

/// Same with sharded AdamW state (gathered over the sharding group, then over ep).
#[test]
fn a_dp2_ep2_fsdp2_checkpoint_is_the_one_rank_checkpoint() {
    checkpoint_matches_one_rank("fsdp", &["parallel.fsdp=2", "parallel.ep=2"]);
}

/// Same with sharded Muon momentum.
#[test]
fn a_dp2_ep2_fsdp2_muon_checkpoint_is_the_one_rank_checkpoint() {
    checkpoint_matches_one_rank(
        "fsdp-muon",
        &["optim.name=\"muon\"", "parallel.fsdp=2", "parallel.ep=2"],
    );
}

/// Same with parameters sharded between steps (gathered for the checkpoint), AdamW and
/// Muon.
#[test]
fn a_dp2_ep2_fsdp3_checkpoint_is_the_one_rank_checkpoint() {
    checkpoint_matches_one_rank("fsdp3", &["parallel.fsdp=3", "parallel.ep=2"]);
    checkpoint_matches_one_rank(
        "fsdp3-muon",
        &["optim.name=\"muon\"", "parallel.fsdp=3", "parallel.ep=2"],
    );
}

fn checkpoint_matches_one_rank(label: &str, layout: &[&str]) {
    let dir = std::env::temp_dir().join(format!(
        "megamoe-layouts-ckpt-{label}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let sets: Vec<String> = layout
        .iter()
        .filter(|s| s.starts_with("optim"))
        .map(|s| s.to_string())
        .collect();
    let steps = 3;
    let mut one_sets = sets.clone();
    one_sets.push("parallel.microbatches=4".to_string());
    let mut one = Trainer::new(&raw(&one_sets), data(), TrainerOptions::default()).unwrap();
    for _ in 0..steps {
        one.step().unwrap();
    }
    let one_dir = one.save_checkpoint(&dir.join("one")).unwrap();

    let mut dist_sets: Vec<String> = layout.iter().map(|s| s.to_string()).collect();
    dist_sets.push("parallel.dp=2".to_string());
    let dist_raw = raw(&dist_sets);
    let four_dir = thread_ranks_checkpoint(4, &dist_raw, steps, &dir.join("four"));

    let load = |d: &std::path::Path| load_checkpoint(d, &Expected::default()).unwrap();
    let (a, b) = (load(&one_dir), load(&four_dir));
    assert_eq!(a.state.step, b.state.step);
    assert_eq!(a.state.data, b.state.data, "same data position");
    let mut compared = 0;
    for (xs, ys) in [(&a.model, &b.model), (&a.optimizer, &b.optimizer)] {
        let names = |v: &[NamedTensor]| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(xs), names(ys));
        for (x, y) in xs.iter().zip(ys.iter()) {
            assert_eq!(x.shape, y.shape, "{}", x.name);
            let scale = x.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = x
                .data
                .iter()
                .zip(&y.data)
                .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= 1e-4 * scale.max(1e-6),
                "{}: max diff {diff:e} (scale {scale:e})",
                x.name
            );
            compared += 1;
        }
    }
    assert!(
        a.model.iter().any(|t| t.name.contains("experts")),
        "the model has expert banks"
    );
    assert!(compared > 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `parallel.fsdp = 2` a rank keeps AdamW moments for its rows only: its state is
/// smaller than a replicated rank's by about half of the moments (2 of 4 bytes-per-value
/// copies of the parameters, over 2 ranks).
#[test]
fn sharded_ranks_hold_part_of_the_optimizer_state() {
    let bytes = |level: usize| {
        let raw = raw(&[
            "parallel.dp=2".to_string(),
            format!("parallel.fsdp={level}"),
        ]);
        run_thread_ranks(2, |world| -> Result<_, Error> {
            let t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
            Ok((t.counts().state_bytes, t.counts().params))
        })
        .unwrap()
    };
    let (replicated, sharded) = (bytes(0), bytes(2));
    for r in 0..2 {
        let (full, params) = replicated[r];
        let (part, _) = sharded[r];
        // replicated: params + grads + 2 moments; sharded: the moments of about half the rows
        let moments = 2 * 4 * params;
        let saved = full - part;
        assert!(
            saved * 10 >= moments * 4 && saved * 10 <= moments * 6,
            "rank {r}: replicated {full} B, sharded {part} B, moments {moments} B"
        );
    }
}
