//! Tensor-parallel layout invariance (the style of `tests/layouts.rs`): under `parallel.tp`
//! the ranks of a TP group read the same micro-batches and each holds a slice of every
//! attention and dense / shared-expert FFN matrix; the per-step losses equal one rank's
//! (f32, ≤ 1e-5 relative, 10 steps, every rank), and so do the gradient norms (≤ 1e-4:
//! the TP slices' squares are summed over the group, replicated ones counted once).
//!
//! The model has 4 query heads over 2 KV heads (GQA groups of 2, kept whole on a TP rank),
//! a dense layer and an MoE layer with a gated shared expert, aux and z losses and the
//! expert bias; capacity off (dropless) and on (capacity factor 1); AdamW, and Muon with
//! each TP slice's matrix gathered for its Newton-Schulz step. Combined with
//! `parallel.fsdp` 1, 2 and 3 (FSDP rows of each TP slice over the data-parallel ranks),
//! and with `parallel.sp` (sequence parallelism: the residual stream sharded along T over
//! the TP group, all-gather / reduce-scatter around the split branches).
#![allow(clippy::unwrap_used)]

use megamoe_plan::RawConfig;
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{load_checkpoint, Error, Expected, StepMetrics, Trainer, TrainerOptions};

#[path = "common/layout.rs"]
mod layout;

use layout::{curve, data, thread_ranks_checkpoint, BASE, STEPS};

/// The shared layout-test model with 4 query heads over 2 KV heads (GQA groups of 2, kept
/// whole on a TP rank).
fn raw(sets: &[String]) -> RawConfig {
    let mut all = vec![
        "model.n_heads=4".to_string(),
        "model.n_kv_heads=2".to_string(),
    ];
    all.extend_from_slice(sets);
    RawConfig::from_toml_str_with_overrides(BASE, &all).unwrap()
}

fn one_rank(sets: &[String], micro: usize) -> Vec<(f64, f64)> {
    layout::one_rank(raw, sets, micro)
}

/// Every rank's curve under dp × ep × tp (one micro-batch per data rank).
fn ranks(sets: &[String], dp: usize, ep: usize, tp: usize) -> Vec<Vec<(f64, f64)>> {
    let mut sets = sets.to_vec();
    sets.extend([
        format!("parallel.dp={dp}"),
        format!("parallel.ep={ep}"),
        format!("parallel.tp={tp}"),
        "parallel.microbatches=1".to_string(),
    ]);
    let raw = raw(&sets);
    run_thread_ranks(dp * ep * tp, |world| -> Result<_, Error> {
        let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
        let m: Vec<StepMetrics> = (0..STEPS).map(|_| t.step()).collect::<Result<_, _>>()?;
        Ok(curve(&m))
    })
    .unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

fn check(label: &str, sets: &[String], dp: usize, ep: usize, tp: usize) -> f64 {
    let want = one_rank(sets, dp * ep);
    assert!(
        rel(want[STEPS - 1].0, want[0].0) > 1e-3,
        "{label}: loss did not move: {want:?}"
    );
    let got = ranks(sets, dp, ep, tp);
    assert_eq!(got.len(), dp * ep * tp);
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

fn check_layout(dp: usize, ep: usize, tp: usize) {
    check_layout_with(dp, ep, tp, &[]);
}

/// [`check_layout`] with `extra` settings (e.g. `parallel.sp=true`) on top.
fn check_layout_with(dp: usize, ep: usize, tp: usize, extra: &[&str]) {
    for optim in ["adamw", "muon"] {
        for (cap, mut sets) in [
            ("dropless", vec![]),
            ("capacity", vec!["moe.capacity_factor=1.0".to_string()]),
        ] {
            sets.push(format!("optim.name=\"{optim}\""));
            sets.extend(extra.iter().map(|s| s.to_string()));
            let label = format!("dp{dp}xep{ep}xtp{tp} {extra:?} {optim}/{cap}");
            check(&label, &sets, dp, ep, tp);
        }
    }
}

const SP: &str = "parallel.sp=true";

/// Sequence parallel: each TP rank holds 4 of the 8 tokens of each of the micro-batch's 8
/// sequences between the branches; AdamW and Muon, capacity off and on.
#[test]
fn tp2_sp_matches_one_rank() {
    check_layout_with(1, 1, 2, &[SP]);
}

#[test]
fn tp2_dp2_sp_matches_one_rank() {
    check_layout_with(2, 1, 2, &[SP]);
}

/// tp2 × sp with fsdp over 2 data ranks (2: optimizer state and gradients, 3: parameters).
#[test]
fn tp2_dp2_sp_fsdp_matches_one_rank() {
    for fsdp in [2, 3] {
        for optim in ["adamw", "muon"] {
            check(
                &format!("dp2xtp2 sp fsdp{fsdp} {optim}/dropless"),
                &[
                    SP.to_string(),
                    format!("parallel.fsdp={fsdp}"),
                    format!("optim.name=\"{optim}\""),
                ],
                2,
                1,
                2,
            );
        }
    }
}

/// tp2 × sp with one sequence per micro-batch (the all-gather needs no reorder), with
/// expert parallelism, with an MTP head (run on the gathered sequence) and an untied head,
/// and with full recompute (the recomputed forward gathers again).
#[test]
fn tp2_sp_variants_match_one_rank() {
    let sp = SP.to_string();
    check(
        "dp2xep2xtp2 sp muon/capacity",
        &[
            sp.clone(),
            "moe.capacity_factor=1.0".to_string(),
            "optim.name=\"muon\"".to_string(),
        ],
        2,
        2,
        2,
    );
    check(
        "dp2xtp2 sp one sequence per micro-batch, mtp, untied head, adamw",
        &[
            sp.clone(),
            "train.global_batch=2".to_string(),
            "mtp.depth=1".to_string(),
            "model.tie_embeddings=false".to_string(),
        ],
        2,
        1,
        2,
    );
    check(
        "tp2 sp recompute full",
        &[sp.clone(), "train.recompute=\"full\"".to_string()],
        1,
        1,
        2,
    );
}

#[test]
fn tp2_matches_one_rank() {
    check_layout(1, 1, 2);
}

#[test]
fn tp2_dp2_matches_one_rank() {
    check_layout(2, 1, 2);
}

/// tp × fsdp: FSDP shards the rows of each TP slice over the data-parallel ranks
/// (`parallel.fsdp` 2: optimizer state and gradients; 3: the parameters too, gathered per
/// block), AdamW and distributed Muon (rows over dp, then slices over tp).
#[test]
fn tp2_dp2_fsdp_matches_one_rank() {
    for fsdp in [2, 3] {
        for optim in ["adamw", "muon"] {
            check(
                &format!("dp2xtp2 fsdp{fsdp} {optim}/dropless"),
                &[
                    format!("parallel.fsdp={fsdp}"),
                    format!("optim.name=\"{optim}\""),
                ],
                2,
                1,
                2,
            );
        }
    }
}

#[test]
fn tp2_dp2_fsdp1_ep_matches_one_rank() {
    // fsdp 1 over dp with experts split over ep: dense rows over dp·ep, expert rows over dp
    check(
        "dp2xep2xtp2 fsdp1 muon/capacity",
        &[
            "parallel.fsdp=1".to_string(),
            "moe.capacity_factor=1.0".to_string(),
            "optim.name=\"muon\"".to_string(),
        ],
        2,
        2,
        2,
    );
}

#[test]
fn tp2_ep2_matches_one_rank() {
    for optim in ["adamw", "muon"] {
        check(
            &format!("dp1xep2xtp2 {optim}/capacity"),
            &[
                "moe.capacity_factor=1.0".to_string(),
                format!("optim.name=\"{optim}\""),
            ],
            1,
            2,
            2,
        );
    }
}

/// Every parameter's shape on every TP rank for tp 1, 2 and 4: the Megatron split of the
/// module doc (`megamoe_model::tp`), hand-derived from the config (H 16, 4 query heads and
/// 2 KV heads of D 4, F 32, shared Fs 8, E 4 routed experts of width 16, V 256).
#[test]
fn tp_partition_shapes() {
    // (name, one-rank shape, split dim)
    let table: [(&str, [usize; 2], Option<usize>); 12] = [
        ("model.layers.0.self_attn.q_proj.weight", [16, 16], Some(0)),
        ("model.layers.0.self_attn.k_proj.weight", [8, 16], Some(0)),
        ("model.layers.0.self_attn.v_proj.weight", [8, 16], Some(0)),
        ("model.layers.0.self_attn.o_proj.weight", [16, 16], Some(1)),
        ("model.layers.0.mlp.gate_proj.weight", [32, 16], Some(0)),
        ("model.layers.0.mlp.up_proj.weight", [32, 16], Some(0)),
        ("model.layers.0.mlp.down_proj.weight", [16, 32], Some(1)),
        (
            "model.layers.1.mlp.shared_experts.up_proj",
            [8, 16],
            Some(0),
        ),
        (
            "model.layers.1.mlp.shared_experts.down_proj",
            [16, 8],
            Some(1),
        ),
        ("model.layers.1.mlp.router.weight", [4, 16], None),
        (
            "model.layers.1.mlp.shared_expert_gate.weight",
            [1, 16],
            None,
        ),
        ("model.embed_tokens.weight", [256, 16], None),
    ];
    let full = Trainer::new(&raw(&[]), data(), TrainerOptions::default()).unwrap();
    let mut whole = std::collections::HashMap::new();
    full.params().visit(&mut |n, t, _| {
        whole.insert(n.to_string(), t.to_host_f32().unwrap());
    });
    for tp in [1usize, 2, 4] {
        let mut sets = vec![format!("parallel.tp={tp}")];
        if tp == 4 {
            // 4 KV heads so that tp = 4 holds whole KV heads
            sets.push("model.n_kv_heads=4".to_string());
        }
        let raw = raw(&sets);
        let shapes = run_thread_ranks(tp, |world| -> Result<_, Error> {
            let t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), world)?;
            let mut v = Vec::new();
            t.params().visit(&mut |n, p, _| {
                v.push((n.to_string(), p.dims().to_vec(), p.to_host_f32().unwrap()))
            });
            Ok(v)
        })
        .unwrap();
        for (rank, params) in shapes.iter().enumerate() {
            for (name, mut shape, dim) in table {
                // with 4 KV heads (tp 4) k/v have 16 rows, other values than the table's
                let kv4 = tp == 4 && (name.contains("k_proj") || name.contains("v_proj"));
                if kv4 {
                    shape[0] = 16;
                }
                let mut local = shape;
                if let Some(d) = dim {
                    local[d] /= tp;
                }
                let (_, got, values) = params
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .unwrap_or_else(|| panic!("tp {tp} rank {rank}: no {name}"));
                assert_eq!(got, &local.to_vec(), "tp {tp} rank {rank}: {name}");
                // the slice is the one-rank tensor's rows / columns
                if kv4 {
                    continue;
                }
                let w = &whole[name];
                let expect: Vec<f32> = match dim {
                    None => w.clone(),
                    Some(0) => {
                        let n = local[0] * local[1];
                        w[rank * n..(rank + 1) * n].to_vec()
                    }
                    Some(_) => (0..local[0])
                        .flat_map(|r| {
                            let start = r * shape[1] + rank * local[1];
                            w[start..start + local[1]].to_vec()
                        })
                        .collect(),
                };
                assert_eq!(values, &expect, "tp {tp} rank {rank}: {name} values");
            }
        }
    }
}

#[test]
fn bad_tp_layouts_are_refused_by_name() {
    for (sets, world, field) in [
        // 2 KV heads cannot be split 4 ways (GQA groups kept whole)
        (vec!["parallel.tp=4"], 4, "model.n_kv_heads"),
        // 4 query heads cannot be split 8 ways
        (
            vec!["parallel.tp=8", "model.n_kv_heads=4"],
            8,
            "model.n_heads",
        ),
        // sequence parallel: 2 does not divide 9 tokens; GateSkip reads whole sequences
        (
            vec!["parallel.tp=2", "parallel.sp=true", "model.seq_len=9"],
            2,
            "model.seq_len",
        ),
        (
            vec!["parallel.tp=2", "parallel.sp=true", "gateskip.enabled=true"],
            2,
            "gateskip",
        ),
    ] {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let raw = raw(&sets);
        let failures = run_thread_ranks(world, |world| -> Result<(), Error> {
            Trainer::new_rank(&raw, data(), TrainerOptions::default(), world).map(|_| ())
        })
        .unwrap_err();
        assert!(failures.first.1.contains(field), "{sets:?}: {failures}");
    }
}

/// A checkpoint written by rank 0 of tp2 holds the one-rank checkpoint's tensors (TP
/// slices and their AdamW moments / Muon momentum gathered): same names and shapes, values
/// equal up to summation order.
#[test]
fn a_tp2_checkpoint_is_the_one_rank_checkpoint() {
    for optim in ["adamw", "muon"] {
        checkpoint_matches_one_rank(optim, 1, 0);
    }
}

/// Under tp2 × dp2 with `parallel.fsdp` 2 and 3 too: FSDP rows gathered, then TP slices.
#[test]
fn a_tp2_dp2_fsdp_checkpoint_is_the_one_rank_checkpoint() {
    checkpoint_matches_one_rank("adamw", 2, 2);
    checkpoint_matches_one_rank("muon", 2, 3);
}

/// Saves after 3 steps on one rank (`dp` micro-batches) and under tp2 × `dp` with
/// `parallel.fsdp = fsdp`, and compares the two checkpoints.
fn checkpoint_matches_one_rank(optim: &str, dp: usize, fsdp: usize) {
    let dir = std::env::temp_dir().join(format!(
        "megamoe-layouts-tp-{optim}-dp{dp}-fsdp{fsdp}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let steps = 3;
    let optim_set = format!("optim.name=\"{optim}\"");
    let one_raw = raw(&[optim_set.clone(), format!("parallel.microbatches={dp}")]);
    let mut one = Trainer::new(&one_raw, data(), TrainerOptions::default()).unwrap();
    for _ in 0..steps {
        one.step().unwrap();
    }
    let one_dir = one.save_checkpoint(&dir.join("one")).unwrap();
    let tp_raw = raw(&[
        "parallel.tp=2".to_string(),
        format!("parallel.dp={dp}"),
        format!("parallel.fsdp={fsdp}"),
        "parallel.microbatches=1".to_string(),
        optim_set,
    ]);
    let tp_dir = thread_ranks_checkpoint(2 * dp, &tp_raw, steps, &dir.join("tp2"));
    let load = |d: &std::path::Path| load_checkpoint(d, &Expected::default()).unwrap();
    let (a, b) = (load(&one_dir), load(&tp_dir));
    let mut compared = 0;
    for (xs, ys) in [(&a.model, &b.model), (&a.optimizer, &b.optimizer)] {
        assert_eq!(xs.len(), ys.len());
        for (x, y) in xs.iter().zip(ys.iter()) {
            assert_eq!(x.name, y.name);
            assert_eq!(x.shape, y.shape, "{}", x.name);
            let scale = x.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = x
                .data
                .iter()
                .zip(&y.data)
                .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= 1e-4 * scale.max(1e-6),
                "{optim} {}: max diff {diff:e} (scale {scale:e})",
                x.name
            );
            compared += 1;
        }
    }
    assert!(compared > 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint written under tp2 at step 4 (the one-rank layout) resumes under tp2 (bit
/// for bit: every rank takes its slices back), under one rank and under tp2 × dp2, and
/// the resumed steps have the uninterrupted tp2 run's losses (≤ 1e-5 relative).
#[test]
fn a_tp2_checkpoint_resumes_under_other_layouts_with_the_same_losses() {
    const ALL: usize = 7;
    const SAVE_AT: u64 = 4;
    let dir = std::env::temp_dir().join(format!("megamoe-tp-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let muon = "optim.name=\"muon\"".to_string();
    // rank 0's losses of the steps after `resume` (or from 0), saving at SAVE_AT into `save`
    let run = |layout: &[&str], world: usize, resume: bool, save: bool| -> Vec<f64> {
        let mut sets = vec![muon.clone(), "parallel.microbatches=1".to_string()];
        sets.extend(layout.iter().map(|s| s.to_string()));
        if !layout.iter().any(|s| s.starts_with("parallel.dp")) {
            sets[1] = "parallel.microbatches=2".to_string();
        }
        let raw = raw(&sets);
        let steps = |t: &mut Trainer| -> Result<Vec<f64>, Error> {
            if resume {
                t.load_checkpoint(&dir.join(format!("ckpt-{SAVE_AT:08}")))?;
            }
            let mut losses = Vec::new();
            while (t.step_count() as usize) < ALL {
                losses.push(t.step()?.loss.total);
                if save && t.step_count() == SAVE_AT {
                    if t.is_writer() {
                        t.save_checkpoint(&dir)?;
                    } else {
                        t.join_checkpoint()?;
                    }
                }
            }
            Ok(losses)
        };
        if world == 1 {
            let mut t = Trainer::new(&raw, data(), TrainerOptions::default()).unwrap();
            return steps(&mut t).unwrap();
        }
        run_thread_ranks(world, |comm| {
            let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), comm)?;
            steps(&mut t)
        })
        .unwrap()
        .remove(0)
    };
    let whole = run(&["parallel.tp=2"], 2, false, true);
    assert_eq!(whole.len(), ALL);
    let want = &whole[SAVE_AT as usize..];
    let same = run(&["parallel.tp=2"], 2, true, false);
    assert_eq!(same, want, "tp2 resumed");
    for (name, layout, world) in [
        ("one rank", &[][..], 1),
        ("tp2 x dp2", &["parallel.tp=2", "parallel.dp=2"][..], 4),
    ] {
        let got = run(layout, world, true, false);
        assert_eq!(got.len(), want.len(), "{name}");
        for (s, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                rel(*g, *w) <= 1e-5,
                "{name}: resumed step {}: loss {g} vs uninterrupted tp2 {w}",
                SAVE_AT as usize + s + 1
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
