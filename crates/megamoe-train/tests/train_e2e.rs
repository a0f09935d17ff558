//! End-to-end runs of the trainer on a micro config (seconds in the test profile):
//! loss falls and the run directory is complete; a resumed run repeats the losses of
//! an uninterrupted one bit for bit; an interrupted checkpoint write leaves the last
//! good checkpoint loadable; the NaN/Inf guard skips updates and then stops the run.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use megamoe_plan::RawConfig;
use megamoe_tensor::Tensor;
use megamoe_train::metrics::{latest_steps, read_metrics, MetricsRecord, METRICS_FILE};
use megamoe_train::session::SUMMARY_FILE;
use megamoe_train::{
    run_training, DataSource, Error, Progress, RunOptions, RunSummary, Tokenizer, Trainer,
    TrainerOptions,
};

/// A 2-layer byte-level MoE config (layer 1 MoE, 4 experts top-2) with two
/// micro-batches per step, so gradient accumulation is on the tested path.
const MICRO: &str = r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
seq_len = 32
tie_embeddings = true

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 32
aux_loss = "aux"
aux_loss_weight = 0.01
z_loss_weight = 0.001
first_dense_layers = 1

[parallel]
microbatches = 2

[train]
global_batch = 4
steps = 40
seed = 7
eval_every = 10
eval_batches = 1
log_every = 5

[optim]
name = "adamw"
lr = 1e-2
min_lr = 1e-3
warmup_steps = 3
grad_clip = 1.0
"#;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("megamoe_train_e2e_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn trainer(overrides: &[&str]) -> Trainer {
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(MICRO, &sets).unwrap();
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    Trainer::new(&raw, data, TrainerOptions::default()).unwrap()
}

fn opts(total_steps: u64) -> RunOptions {
    RunOptions {
        total_steps,
        show_every: 5,
        sample_tokens: 8,
    }
}

/// Runs `t` up to step `total` into `dir` without a progress display.
fn train(t: &mut Trainer, dir: &Path, total: u64) -> megamoe_train::Result<RunSummary> {
    let mut progress = Progress::hidden(t.step_count(), total);
    run_training(t, dir, &opts(total), &mut progress)
}

/// (step, total loss) of every step record, last record per step.
fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    let records = read_metrics(&run_dir.join(METRICS_FILE)).unwrap();
    latest_steps(&records)
        .iter()
        .map(|s| (s.step, s.loss.total))
        .collect()
}

fn param_values(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    t.params()
        .visit(&mut |name, p, _| out.push((name.to_string(), p.to_host_f32().unwrap())));
    out
}

fn buffer_values(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    t.params()
        .visit_buffers(&mut |name, b| out.push((name.to_string(), b.to_host_f32().unwrap())));
    out
}

#[test]
fn micro_run_loss_falls_and_run_dir_is_complete() {
    let dir = scratch("loss_falls");
    let mut t = trainer(&[]);
    let summary = train(&mut t, &dir, 30).unwrap();
    let l = losses(&dir);
    assert_eq!(l.len(), 30);
    let (first, last) = (l[0].1, l[29].1);
    // ln(256) ≈ 5.55 at init; 30 steps on the synthetic domains must cut it clearly.
    assert!(first > 5.0, "first loss {first}");
    assert!(last < 0.8 * first, "first {first} last {last}");
    assert_eq!(summary.final_step, 30);
    // Layer 1 is the MoE layer: every step reports its routing (K = 2 slots per token).
    let records = read_metrics(&dir.join(METRICS_FILE)).unwrap();
    for s in latest_steps(&records) {
        assert_eq!(s.moe.len(), 1);
        assert_eq!(s.moe[0].layer, 1);
        let slots: u64 = s.moe[0].tokens_per_expert.iter().sum();
        assert_eq!(slots, 4 * 32 * 2, "B·T tokens × top-2, no null slots");
        assert!(s.loss.aux > 0.0);
    }
    assert!(dir.join(SUMMARY_FILE).is_file());
    assert!(dir.join("checkpoints/latest").is_file());
    assert!(dir
        .join("checkpoints/ckpt-00000030/model.safetensors")
        .is_file());
    let records = read_metrics(&dir.join(METRICS_FILE)).unwrap();
    let evals = records
        .iter()
        .filter(|r| matches!(r, MetricsRecord::Eval(_)))
        .count();
    assert_eq!(evals, 3, "eval_every = 10 over 30 steps");
    assert!(records
        .iter()
        .any(|r| matches!(r, MetricsRecord::Sample(_))));
    assert!(records
        .iter()
        .any(|r| matches!(r, MetricsRecord::Goodput(_))));
    let report = megamoe_train::render_report(&dir).unwrap();
    assert!(report.files.iter().all(|f| f.is_file()));
}

#[test]
fn two_micro_batches_give_the_gradient_of_one_batch() {
    // Dense model: every loss is a mean over tokens, and both micro-batches hold the
    // same number of tokens, so accumulating 2 × (1/2)·∇mean equals ∇mean of the whole
    // batch; a missing or doubled 1/M scale would show as a factor 2 in the norm.
    let dense = MICRO.replace("[moe]", "[unused_moe]");
    let dense = dense.split("[unused_moe]").next().unwrap().to_string()
        + &MICRO[MICRO.find("[parallel]").unwrap()..];
    let build = |m: &str| {
        let raw = RawConfig::from_toml_str_with_overrides(
            &dense,
            &[format!("parallel.microbatches={m}")],
        )
        .unwrap();
        let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
        Trainer::new(&raw, data, TrainerOptions::default()).unwrap()
    };
    let (mut one, mut two) = (build("1"), build("2"));
    let (a, b) = (one.step().unwrap(), two.step().unwrap());
    assert!(a.moe.is_empty());
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs();
    // f32 sums in another order: agreement to ~1e-6 relative, 1e-4 leaves margin.
    assert!(
        rel(a.grad_norm, b.grad_norm) < 1e-4,
        "{} vs {}",
        a.grad_norm,
        b.grad_norm
    );
    assert!(
        rel(a.loss.total, b.loss.total) < 1e-5,
        "{} vs {}",
        a.loss.total,
        b.loss.total
    );
}

#[test]
fn resume_after_10_steps_repeats_losses_of_straight_20() {
    let straight = scratch("resume_straight");
    // Aux-loss-free balancing on: the expert-bias buffers must round-trip too.
    let bias = ["moe.expert_bias=true", "moe.bias_update_rate=0.01"];
    let mut a = trainer(&bias);
    train(&mut a, &straight, 20).unwrap();

    let split = scratch("resume_split");
    let mut b = trainer(&bias);
    train(&mut b, &split, 10).unwrap();
    drop(b);
    let mut c = trainer(&bias);
    c.load_checkpoint(&split).unwrap();
    assert_eq!(c.step_count(), 10);
    train(&mut c, &split, 20).unwrap();

    let (la, lc) = (losses(&straight), losses(&split));
    assert_eq!(la.len(), 20);
    assert_eq!(lc.len(), 20);
    for (x, y) in la.iter().zip(&lc).skip(10) {
        assert_eq!(x.0, y.0);
        assert_eq!(
            x.1.to_bits(),
            y.1.to_bits(),
            "step {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
    assert_eq!(param_values(&a), param_values(&c));
    assert_eq!(buffer_values(&a), buffer_values(&c));
    // The bias moved away from its zero init, so the comparison above is not vacuous.
    assert!(buffer_values(&a)
        .iter()
        .any(|(_, v)| v.iter().any(|&x| x != 0.0)));
}

#[test]
fn resume_with_other_config_is_a_named_error_and_changes_nothing() {
    let dir = scratch("resume_mismatch");
    let mut a = trainer(&[]);
    train(&mut a, &dir, 3).unwrap();
    let mut b = trainer(&["optim.lr=0.02"]);
    let before = param_values(&b);
    let err = b.load_checkpoint(&dir).unwrap_err();
    assert!(
        matches!(err, Error::CheckpointConfigMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("lr"), "{err}");
    assert_eq!(b.step_count(), 0);
    assert_eq!(param_values(&b), before);
}

#[test]
fn interrupted_checkpoint_write_leaves_last_good_checkpoint() {
    let dir = scratch("interrupted");
    let mut a = trainer(&["train.checkpoint_every=5"]);
    train(&mut a, &dir, 10).unwrap();
    let ckpts = dir.join("checkpoints");
    // A process killed while writing step 15: its temp directory holds a partial
    // model file and no state.json; `latest` still names step 10.
    let tmp = ckpts.join("ckpt-00000015.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"\x10\x00\x00\x00partial").unwrap();

    let mut b = trainer(&["train.checkpoint_every=5"]);
    b.load_checkpoint(&dir).unwrap();
    assert_eq!(b.step_count(), 10);
    assert_eq!(param_values(&a), param_values(&b));
    // Training on past the crashed step replaces the debris with a real checkpoint.
    train(&mut b, &dir, 15).unwrap();
    assert!(!tmp.exists());
    let mut c = trainer(&["train.checkpoint_every=5"]);
    c.load_checkpoint(&dir).unwrap();
    assert_eq!(c.step_count(), 15);
}

#[test]
fn nonfinite_steps_are_skipped_then_stop_the_run() {
    let dir = scratch("nonfinite");
    let mut t = trainer(&["train.max_nonfinite_steps=2"]);
    // Poison the final norm's weight: every loss from now on is NaN.
    let mut poisoned = None;
    t.params_mut().visit_mut(&mut |name, p, _| {
        if name == "model.norm.weight" {
            let n = p.numel();
            *p = Tensor::from_vec_f32(vec![f32::NAN; n], [n], p.device()).unwrap();
            poisoned = Some(name.to_string());
        }
    });
    assert!(poisoned.is_some());
    let before = param_values(&t);
    let err = train(&mut t, &dir, 10).unwrap_err();
    match err {
        Error::NonFiniteSteps {
            step,
            streak,
            limit,
        } => assert_eq!((step, streak, limit), (3, 3, 2)),
        other => panic!("expected NonFiniteSteps, got {other}"),
    }
    // No update happened: every parameter is bit-identical (NaN compared by bits).
    let bits = |v: &[(String, Vec<f32>)]| -> Vec<(String, Vec<u32>)> {
        v.iter()
            .map(|(n, x)| (n.clone(), x.iter().map(|f| f.to_bits()).collect()))
            .collect()
    };
    assert_eq!(bits(&param_values(&t)), bits(&before));
    let records = read_metrics(&dir.join(METRICS_FILE)).unwrap();
    let steps = latest_steps(&records);
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|s| s.skipped && s.loss.total.is_nan()));
    assert!(
        !dir.join("checkpoints/latest").exists(),
        "a stopped run saves nothing"
    );
}
