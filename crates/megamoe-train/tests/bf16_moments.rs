//! AdamW with bf16 moments (`optim.moment_dtype = "bf16"`) in the trainer, on the CPU:
//! - the loss curve of a short training run stays close to the f32-moment run's (bound
//!   below) but is not the same run;
//! - the optimizer state is half the bytes, and checkpoints store the moments as bf16;
//! - a resumed run repeats the uninterrupted one bit for bit; resuming with the other
//!   moment dtype is a named error;
//! - layout invariance holds (data-parallel, expert-parallel, sharded optimizer state
//!   and parameters: the same per-step losses as one rank, 1e-5 relative), and a sharded
//!   checkpoint is the one-rank checkpoint (bf16 moments stored bf16 by every rank);
//! - bad settings are named config errors.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use megamoe_plan::RawConfig;
use megamoe_tensor::DType;
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{
    load_checkpoint, Error, Expected, NamedTensor, StepMetrics, Trainer, TrainerOptions,
};

#[path = "common/layout.rs"]
mod layout;

use layout::{curve, data, rel, thread_ranks_checkpoint, BASE, STEPS};

const BF16: &str = "optim.moment_dtype=\"bf16\"";

fn raw(sets: &[String]) -> RawConfig {
    RawConfig::from_toml_str_with_overrides(BASE, sets).unwrap()
}

fn strings(sets: &[&str]) -> Vec<String> {
    sets.iter().map(|s| s.to_string()).collect()
}

fn trainer(sets: &[&str]) -> Trainer {
    Trainer::new(&raw(&strings(sets)), data(), TrainerOptions::default()).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "megamoe_bf16_moments_{}_{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn losses(t: &mut Trainer, steps: usize) -> Vec<f64> {
    (0..steps)
        .map(|_| {
            let m = t.step().unwrap();
            assert!(!m.skipped && m.loss.total.is_finite());
            m.loss.total
        })
        .collect()
}

fn param_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    t.params().visit(&mut |n, p, _| {
        let bits = p
            .to_host_f32()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        out.push((n.to_string(), bits));
    });
    out
}

/// 30 steps with f32 and with bf16 moments (AdamW and Muon's AdamW part). A bf16 moment
/// is its f32 value rounded to 8 significant bits (relative error ≤ 2⁻⁹ per step), so
/// each update m̂/√v̂ moves by at most ~0.4 % of itself, in random directions across
/// elements: the losses stay within 1 % of the f32-moment run over 30 steps (measured on
/// this model: 1.9e-3 AdamW, 2.4e-4 Muon), while the loss itself falls by over 10 %. The runs differ (the bf16
/// moments are in use).
#[test]
fn bf16_moments_track_the_f32_moment_loss_curve() {
    for optim in ["adamw", "muon"] {
        let name = format!("optim.name=\"{optim}\"");
        let f32_run = losses(&mut trainer(&[&name]), 30);
        let bf16_run = losses(&mut trainer(&[&name, BF16]), 30);
        let worst = f32_run
            .iter()
            .zip(&bf16_run)
            .map(|(a, b)| rel(*b, *a))
            .fold(0.0, f64::max);
        eprintln!("{optim}: max rel loss difference bf16 vs f32 moments: {worst:e}");
        let fell = rel(f32_run[29], f32_run[0]);
        assert!(fell > 0.1, "{optim}: the loss must fall: {f32_run:?}");
        assert!(
            worst <= 1e-2,
            "{optim}: {worst:e}: {f32_run:?} vs {bf16_run:?}"
        );
        assert_ne!(f32_run, bf16_run, "{optim}: bf16 moments are in use");
    }
}

/// The optimizer state of AdamW's moments is half the bytes (parameters and gradients
/// unchanged).
#[test]
fn bf16_moments_halve_the_moment_bytes() {
    let (f, b) = (trainer(&[]).counts(), trainer(&[BF16]).counts());
    let moments_f32 = 2 * 4 * f.params;
    assert_eq!(f.state_bytes - b.state_bytes, moments_f32 / 2);
}

/// Save after 4 steps, resume in a fresh trainer, 4 more steps: the same losses and
/// parameters as 8 straight steps, bit for bit; the checkpoint's moments are bf16.
#[test]
fn a_resumed_bf16_moment_run_repeats_the_straight_run_bitwise() {
    for optim in ["adamw", "muon"] {
        let name = format!("optim.name=\"{optim}\"");
        let sets = [name.as_str(), BF16];
        let mut straight = trainer(&sets);
        let want = losses(&mut straight, 8);
        let dir = scratch(&format!("resume_{optim}"));
        let mut first = trainer(&sets);
        let mut got = losses(&mut first, 4);
        let ckpt = first.save_checkpoint(&dir).unwrap();
        drop(first);
        let saved = load_checkpoint(&ckpt, &Expected::default()).unwrap();
        let moments: Vec<&NamedTensor> = saved
            .optimizer
            .iter()
            .filter(|t| t.name.starts_with("exp_avg"))
            .collect();
        assert!(!moments.is_empty());
        assert!(moments.iter().all(|t| t.dtype == DType::BF16), "{optim}");
        let others = saved
            .optimizer
            .iter()
            .filter(|t| !t.name.starts_with("exp_avg"));
        assert!(others.into_iter().all(|t| t.dtype == DType::F32), "{optim}");
        let mut resumed = trainer(&sets);
        resumed.load_checkpoint(&ckpt).unwrap();
        got.extend(losses(&mut resumed, 4));
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{optim}: {got:?} vs {want:?}");
        assert_eq!(param_bits(&resumed), param_bits(&straight), "{optim}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Resuming with the other moment dtype names the key and both values, and loads nothing.
#[test]
fn resuming_with_the_other_moment_dtype_is_a_named_error() {
    let dir = scratch("mismatch");
    let mut a = trainer(&[BF16]);
    losses(&mut a, 2);
    let ckpt = a.save_checkpoint(&dir).unwrap();
    let mut b = trainer(&["optim.moment_dtype=\"f32\""]);
    let before = param_bits(&b);
    let err = b.load_checkpoint(&ckpt).unwrap_err();
    assert!(
        matches!(err, Error::CheckpointConfigMismatch { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("moment_dtype"), "{text}");
    assert_eq!(b.step_count(), 0);
    assert_eq!(param_bits(&b), before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_moment_settings_are_named_config_errors() {
    let err = |sets: &[&str]| {
        let raw = RawConfig::from_toml_str_with_overrides(BASE, &strings(sets));
        match raw {
            Err(e) => e.to_string(),
            Ok(raw) => Trainer::new(&raw, data(), TrainerOptions::default())
                .map(|_| ())
                .unwrap_err()
                .to_string(),
        }
    };
    let e = err(&["optim.moment_dtype=\"fp8\""]);
    assert!(e.contains("moment_dtype") && e.contains("fp8"), "{e}");
    for (key, beta) in [("beta2", "0.999"), ("beta1", "0.997")] {
        let set = format!("optim.{key}={beta}");
        let e = err(&[BF16, &set]);
        assert!(
            e.contains(&format!("optim.{key}")) && e.contains(beta) && e.contains("2^-8"),
            "{e}"
        );
        // the same betas are fine with f32 moments, and 1 - 2^-8 with bf16 ones
        err_free(&[&set]);
    }
    err_free(&[BF16, "optim.beta2=0.99609375"]);
}

fn err_free(sets: &[&str]) {
    Trainer::new(&raw(&strings(sets)), data(), TrainerOptions::default()).unwrap();
}

/// Every rank's curve under `parallel.dp = dp, parallel.ep = ep` (one micro-batch each).
fn ranks(sets: &[String], dp: usize, ep: usize) -> Vec<Vec<(f64, f64)>> {
    layout::ranks(raw, sets, (dp, ep), 1)
}

/// Layout invariance with bf16 moments: the same per-step losses as one rank (1e-5
/// relative, as for f32 moments), AdamW and Muon, replicated and sharded.
#[test]
fn bf16_moment_layouts_match_one_rank() {
    for optim in ["adamw", "muon"] {
        for (dp, ep, fsdp) in [(2, 1, 0), (2, 2, 0), (2, 1, 2), (2, 2, 2), (2, 1, 3)] {
            let sets = vec![
                format!("optim.name=\"{optim}\""),
                BF16.to_string(),
                format!("parallel.fsdp={fsdp}"),
            ];
            let want = layout::one_rank(raw, &sets[..2], dp * ep);
            for (r, c) in ranks(&sets, dp, ep).iter().enumerate() {
                for (s, ((l, _), (wl, _))) in c.iter().zip(&want).enumerate() {
                    let e = rel(*l, *wl);
                    assert!(
                        e <= 1e-5,
                        "{optim} dp{dp} ep{ep} fsdp{fsdp}: rank {r} step {}: {l} vs {wl} ({e:e})",
                        s + 1
                    );
                }
            }
        }
    }
}

/// A dp2·ep2·fsdp2 checkpoint of a bf16-moment run is the one-rank checkpoint: the same
/// tensors, the moments stored bf16 by every rank. Values agree to 1e-4 of each tensor's
/// scale (summation order), bf16 moments to one bf16 rounding step of the element (the f32
/// sums of the two layouts can straddle a rounding midpoint).
#[test]
fn a_sharded_bf16_moment_checkpoint_is_the_one_rank_checkpoint() {
    let dir = scratch("sharded");
    let steps = 3;
    let mut one = Trainer::new(
        &raw(&strings(&[BF16, "parallel.microbatches=4"])),
        data(),
        TrainerOptions::default(),
    )
    .unwrap();
    for _ in 0..steps {
        one.step().unwrap();
    }
    let one_dir = one.save_checkpoint(&dir.join("one")).unwrap();
    let dist = raw(&strings(&[
        BF16,
        "parallel.dp=2",
        "parallel.ep=2",
        "parallel.fsdp=2",
    ]));
    let four_dir = thread_ranks_checkpoint(4, &dist, steps, &dir.join("four"));
    let load = |d: &std::path::Path| load_checkpoint(d, &Expected::default()).unwrap();
    let (a, b) = (load(&one_dir), load(&four_dir));
    let mut moments = 0;
    for (x, y) in a.optimizer.iter().zip(&b.optimizer) {
        assert_eq!((&x.name, &x.shape, x.dtype), (&y.name, &y.shape, y.dtype));
        let bf16 = x.dtype == DType::BF16;
        assert_eq!(bf16, x.name.starts_with("exp_avg"), "{}", x.name);
        let scale = x.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (p, q) in x.data.iter().zip(&y.data) {
            let d = (p - q).abs();
            let ok = d <= 1e-4 * scale.max(1e-6) || (bf16 && d <= p.abs().max(q.abs()) / 128.0);
            assert!(ok, "{}: {p} vs {q} (scale {scale:e})", x.name);
        }
        moments += usize::from(bf16);
    }
    assert!(moments > 10);
    // and the sharded one resumes on one rank
    let mut resumed = Trainer::new(
        &raw(&strings(&[BF16, "parallel.microbatches=4"])),
        data(),
        TrainerOptions::default(),
    )
    .unwrap();
    resumed.load_checkpoint(&four_dir).unwrap();
    resumed.step().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pipeline model (4 layers, untied head) with bf16 moments under pipeline, pipeline ×
/// FSDP and tensor-parallel layouts: rank 0's per-step losses equal one rank's (1e-5
/// relative), AdamW and Muon.
#[test]
fn bf16_moment_pipeline_and_tp_layouts_match_one_rank() {
    use layout::{pipeline_raw, pipeline_sets, Mesh, MICRO};
    let meshes = [
        Mesh::pp(2, 1, 1, "1f1b", 0),
        Mesh::pp(2, 2, 1, "1f1b", 2),
        Mesh::pp(1, 1, 1, "1f1b", 0).with_tp(2),
    ];
    for optim in ["adamw", "muon"] {
        let mut sets = pipeline_sets(optim);
        sets.push(BF16.to_string());
        let want = layout::one_rank(pipeline_raw, &sets, MICRO);
        for mesh in &meshes {
            let mut s = sets.clone();
            s.extend(mesh.sets());
            let raw = pipeline_raw(&s);
            let curves = run_thread_ranks(mesh.world(), |w| -> Result<_, Error> {
                let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), w)?;
                let m: Vec<StepMetrics> = (0..STEPS).map(|_| t.step()).collect::<Result<_, _>>()?;
                Ok(curve(&m))
            })
            .unwrap();
            for (s, ((l, _), (wl, _))) in curves[0].iter().zip(&want).enumerate() {
                let e = rel(*l, *wl);
                assert!(
                    e <= 1e-5,
                    "{optim} {}: step {}: {l} vs {wl}",
                    mesh.label(),
                    s + 1
                );
            }
        }
    }
}
