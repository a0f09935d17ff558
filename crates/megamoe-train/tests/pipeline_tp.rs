//! Pipeline × tensor-parallel layout invariance: with `parallel.pp` and `parallel.tp` the
//! tp ranks of each stage hold their slices of its attention and dense / shared-expert
//! matrices; 10 steps give one rank's per-step losses (f32, ≤ 1e-5 relative) and gradient
//! norms (≤ 1e-4), with AdamW and Muon, under 1F1B and DualPipeV, also times dp; a
//! checkpoint written under pp2 × tp2 continues under one rank (and one rank's checkpoint
//! under pp2 × tp2) with the uninterrupted losses; with `parallel.fsdp = 2` too.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use megamoe_plan::{RawConfig, TINY_CONFIG};
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{DataSource, Error, Tokenizer, Trainer, TrainerOptions};

const STEPS: usize = 10;
/// Micro-batches of one step (global batch 8 of 1 sequence each).
const MICRO: usize = 8;

/// A 4-layer MoE model (dense first layer, shared expert with gate, expert bias, aux and
/// z losses, untied head), dropless, with optimizer `optim`.
fn sets(optim: &str) -> Vec<String> {
    [
        "model.d_model=16",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_hidden=32",
        "model.seq_len=8",
        "model.tie_embeddings=false",
        "moe.routed_experts=4",
        "moe.expert_hidden=16",
        "moe.shared_expert_hidden=16",
        "moe.shared_expert_gate=true",
        "moe.expert_bias=true",
        "moe.aux_loss_weight=0.05",
        "moe.z_loss_weight=0.01",
        "train.global_batch=8",
        "train.steps=10",
        "optim.warmup_steps=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("optim.name=\"{optim}\"")])
    .collect()
}

fn raw(sets: &[String]) -> RawConfig {
    RawConfig::from_toml_str_with_overrides(TINY_CONFIG, sets).unwrap()
}

fn data() -> Arc<DataSource> {
    Arc::new(DataSource::synthetic(Tokenizer::bytes()))
}

/// The `--set`s of a layout: dp × pp × tp under `schedule` with `fsdp`.
fn layout(dp: usize, pp: usize, tp: usize, schedule: &str, fsdp: usize) -> Vec<String> {
    vec![
        format!("parallel.dp={dp}"),
        format!("parallel.pp={pp}"),
        format!("parallel.tp={tp}"),
        format!("parallel.fsdp={fsdp}"),
        format!("parallel.microbatches={}", MICRO / dp),
        format!("parallel.schedule=\"{schedule}\""),
    ]
}

/// (loss, grad norm) per step of one rank running all micro-batches.
fn one_rank(optim: &str) -> Vec<(f64, f64)> {
    let mut s = sets(optim);
    s.push(format!("parallel.microbatches={MICRO}"));
    let mut t = Trainer::new(&raw(&s), data(), TrainerOptions::default()).unwrap();
    (0..STEPS)
        .map(|_| {
            let m = t.step().unwrap();
            (m.loss.total, m.grad_norm)
        })
        .collect()
}

/// Rank 0's (loss, grad norm) per step, after checking every rank reports the same.
fn ranks(optim: &str, dp: usize, pp: usize, tp: usize, schedule: &str) -> Vec<(f64, f64)> {
    let mut s = sets(optim);
    s.extend(layout(dp, pp, tp, schedule, 0));
    let raw = raw(&s);
    let curves = run_thread_ranks(dp * pp * tp, |world| -> Result<_, Error> {
        let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
        (0..STEPS)
            .map(|_| t.step().map(|m| (m.loss.total, m.grad_norm)))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap();
    for (r, c) in curves.iter().enumerate() {
        assert_eq!(c, &curves[0], "rank {r} reports rank 0's losses");
    }
    curves[0].clone()
}

fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

fn check(optim: &str) {
    let want = one_rank(optim);
    assert!(
        rel(want[STEPS - 1].0, want[0].0) > 1e-3,
        "the loss moves: {want:?}"
    );
    for (dp, pp, tp, schedule) in [(1, 2, 2, "1f1b"), (1, 2, 2, "dualpipev"), (2, 2, 2, "1f1b")] {
        let got = ranks(optim, dp, pp, tp, schedule);
        let worst = |pick: fn(&(f64, f64)) -> f64| {
            got.iter()
                .zip(&want)
                .map(|(g, w)| rel(pick(g), pick(w)))
                .fold(0.0, f64::max)
        };
        let (loss, norm) = (worst(|x| x.0), worst(|x| x.1));
        eprintln!(
            "{optim} dp{dp} pp{pp} tp{tp} {schedule}: max rel diff loss {loss:.2e}, \
             grad norm {norm:.2e}"
        );
        assert!(
            loss <= 1e-5 && norm <= 1e-4,
            "{optim} dp{dp} pp{pp} tp{tp} {schedule}: {got:?} vs one rank {want:?}"
        );
    }
}

#[test]
fn pipeline_with_tp_matches_one_rank_with_adamw() {
    check("adamw");
}

#[test]
fn pipeline_with_tp_matches_one_rank_with_muon() {
    check("muon");
}

/// Rank 0's losses of the steps a run takes: `layout` (or one rank when empty), resumed
/// from `resume` if given, saving a checkpoint at step `save_at` into `save` if given.
fn run(
    optim: &str,
    layout: &[String],
    world: usize,
    resume: Option<&std::path::Path>,
    save: Option<(&std::path::Path, usize)>,
) -> Vec<f64> {
    let mut s = sets(optim);
    if layout.is_empty() {
        s.push(format!("parallel.microbatches={MICRO}"));
    }
    s.extend_from_slice(layout);
    let raw = raw(&s);
    let body = |mut t: Trainer| -> Result<Vec<f64>, Error> {
        if let Some(dir) = resume {
            t.load_checkpoint(dir)?;
        }
        let mut losses = Vec::new();
        while (t.step_count() as usize) < STEPS {
            losses.push(t.step()?.loss.total);
            if let Some((dir, at)) = save {
                if t.step_count() as usize == at {
                    if t.is_writer() {
                        t.save_checkpoint(dir)?;
                    } else {
                        t.join_checkpoint()?;
                    }
                }
            }
        }
        Ok(losses)
    };
    if world == 1 {
        return body(Trainer::new(&raw, data(), TrainerOptions::default()).unwrap()).unwrap();
    }
    run_thread_ranks(world, |w| {
        body(Trainer::new_rank(
            &raw,
            data(),
            TrainerOptions::default(),
            w,
        )?)
    })
    .unwrap()
    .remove(0)
}

#[test]
fn tp_pipeline_checkpoints_resume_across_layouts() {
    let dir = std::env::temp_dir().join(format!("megamoe-pp-tp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pp_dp = layout(1, 2, 2, "dualpipev", 0);
    let want = run("muon", &[], 1, None, None);
    // pp2 × tp2 saves at step 4 (into a checkpoints directory); one rank continues.
    let saved = dir.join("pp");
    let first = run("muon", &pp_dp, 4, None, Some((&saved, 4)));
    let rest = run("muon", &[], 1, Some(&saved), None);
    // one rank saves at step 4; pp2 × tp2 continues.
    let one_saved = dir.join("one");
    run("muon", &[], 1, None, Some((&one_saved, 4)));
    let rest_pp = run("muon", &pp_dp, 4, Some(&one_saved), None);
    assert_eq!(first.len(), STEPS);
    for (label, got) in [("pp→one", &rest), ("one→pp", &rest_pp)] {
        assert_eq!(got.len(), STEPS - 4, "{label}");
        for (s, (g, w)) in got.iter().zip(&want[4..]).enumerate() {
            assert!(
                rel(*g, *w) <= 1e-5,
                "{label} step {}: {g} vs uninterrupted {w}",
                s + 5
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// pp × tp × fsdp 2: each stage's TP slices' rows sharded over its data ranks (Muon
/// gathers rows, then slices); a checkpoint of it continues under one rank and one rank's
/// under it.
#[test]
fn pipeline_with_tp_and_fsdp_matches_one_rank() {
    for optim in ["adamw", "muon"] {
        let want = one_rank(optim);
        let mut s = sets(optim);
        s.extend(layout(2, 2, 2, "1f1b", 2));
        let raw = raw(&s);
        let curves = run_thread_ranks(8, |world| -> Result<_, Error> {
            let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
            (0..STEPS)
                .map(|_| t.step().map(|m| (m.loss.total, m.grad_norm)))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
        for c in &curves {
            for (s, ((l, n), (wl, wn))) in c.iter().zip(&want).enumerate() {
                assert!(
                    rel(*l, *wl) <= 1e-5 && rel(*n, *wn) <= 1e-4,
                    "{optim} dp2 pp2 tp2 fsdp2 step {}: ({l}, {n}) vs one rank ({wl}, {wn})",
                    s + 1
                );
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("megamoe-pp-tp-fsdp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mesh = layout(2, 2, 2, "1f1b", 2);
    let want = run("muon", &[], 1, None, None);
    run("muon", &mesh, 8, None, Some((&dir, 4)));
    let rest = run("muon", &[], 1, Some(&dir), None);
    // and one rank's checkpoint continues under the mesh (slices, then rows)
    let one_dir = dir.join("one");
    run("muon", &[], 1, None, Some((&one_dir, 4)));
    let rest_mesh = run("muon", &mesh, 8, Some(&one_dir), None);
    for (label, got) in [("mesh→one", &rest), ("one→mesh", &rest_mesh)] {
        assert_eq!(got.len(), STEPS - 4, "{label}");
        for (s, (g, w)) in got.iter().zip(&want[4..]).enumerate() {
            assert!(rel(*g, *w) <= 1e-5, "{label} step {}: {g} vs {w}", s + 5);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each pipeline rank's parameters under pp2 × tp2: both tp ranks of a stage hold the same
/// number of elements, fewer than the stage's whole tensors under pp2 alone.
#[test]
fn tp_ranks_of_a_stage_hold_slices() {
    let held = |tp: usize| -> Vec<(usize, usize, u64)> {
        let mut s = sets("adamw");
        s.extend(layout(1, 2, tp, "1f1b", 0));
        let raw = raw(&s);
        run_thread_ranks(2 * tp, |w| {
            let t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), w)?;
            let c = t.parallel().unwrap().coords();
            Ok((c.pp, c.tp, t.pipeline().unwrap().param_elements()))
        })
        .unwrap()
    };
    let (whole, sliced) = (held(1), held(2));
    for pp in 0..2 {
        let full = whole.iter().find(|r| r.0 == pp).unwrap().2;
        let of = |tp: usize| sliced.iter().find(|r| r.0 == pp && r.1 == tp).unwrap().2;
        assert_eq!(of(0), of(1), "pp {pp}");
        assert!(of(0) < full, "pp {pp}: {} of {full}", of(0));
    }
}
