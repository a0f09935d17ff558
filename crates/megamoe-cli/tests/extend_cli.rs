//! Runs that can be extended, through the built binary: `--steps` past
//! `train.steps` moves the learning-rate horizon, a resume may change the safe
//! set (recorded in metrics.jsonl and the summary) and nothing else, and a
//! warmup longer than the run is refused.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::{stderr, BIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// 2 layers (layer 1 MoE), 4 sequences of 32 tokens per step, 40 steps with a
/// checkpoint every 10, cosine from 1e-2 to 1e-3 after 4 warmup steps.
const MICRO: &str = micro_config!(
    r#"
[train]
global_batch = 4
steps = 40
eval_every = 20
eval_batches = 1
checkpoint_every = 10
log_every = 10

[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 4
lr_schedule = "cosine"
"#
);

const PEAK: f64 = 1e-2;
const MIN: f64 = 1e-3;
const WARMUP: f64 = 4.0;

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("extend", name, Some(MICRO))
}

fn megamoe(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--sample-tokens", "0", "--peak-flops", "1e11"])
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Every record of a run's metrics.jsonl.
fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, lr) of every step record, in file order.
fn lrs(run: &Path) -> Vec<(u64, f64)> {
    records(run)
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| (r["step"].as_u64().unwrap(), r["lr"].as_f64().unwrap()))
        .collect()
}

/// The module doc's cosine for 1-based step `step` of a `total`-step horizon.
fn cosine(step: u64, total: f64) -> f64 {
    let s = (step - 1) as f64;
    if s < WARMUP {
        return PEAK * (s + 1.0) / WARMUP;
    }
    let r = ((s - WARMUP) / (total - WARMUP)).clamp(0.0, 1.0);
    MIN + 0.5 * (1.0 + (std::f64::consts::PI * r).cos()) * (PEAK - MIN)
}

#[test]
fn steps_past_train_steps_extend_the_run_with_a_full_decay() {
    let dir = scratch("extend");
    let first = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--steps",
            "40",
            "--run-dir",
            "r",
        ],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let resumed = megamoe(&dir, &["train", "--resume", "r", "--steps", "80"]);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains("--steps 80 is past train.steps=40"), "{err}");
    assert!(
        err.contains("resume: changed train.steps 40 -> 80 from step 41"),
        "{err}"
    );

    // One record per step 1..=80; steps 41-80 follow the 80-step cosine and end
    // at its last step, next to min_lr.
    let got = lrs(&dir.join("r"));
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=80).collect::<Vec<_>>()
    );
    for &(s, lr) in &got {
        let total = if s <= 40 { 40.0 } else { 80.0 };
        let want = cosine(s, total);
        assert!(
            (lr - want).abs() <= 1e-12 * PEAK,
            "step {s}: lr {lr} vs {want}"
        );
    }
    let last = got[79].1;
    assert!(last - MIN < 1e-3 * (PEAK - MIN), "lr at step 80: {last}");
    assert!(got[40..].windows(2).all(|w| w[1].1 < w[0].1), "decays");

    // The same as one run of train.steps = 80 over steps 41-80.
    let straight = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--set",
            "train.steps=80",
            "--run-dir",
            "s",
        ],
    );
    assert!(straight.status.success(), "{}", stderr(&straight));
    let want = lrs(&dir.join("s"));
    for s in 40..80 {
        assert_eq!(got[s].1.to_bits(), want[s].1.to_bits(), "step {}", s + 1);
    }

    // The change is recorded and the summary covers the whole run.
    let changes: Vec<_> = records(&dir.join("r"))
        .into_iter()
        .filter(|r| r["kind"] == "config_change")
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["step"], 40);
    assert_eq!(changes[0]["key"], "train.steps");
    assert_eq!(
        (&changes[0]["old"], &changes[0]["new"]),
        (&"40".into(), &"80".into())
    );
    let summary = std::fs::read_to_string(dir.join("r/summary.txt")).unwrap();
    assert!(
        summary.contains("whole run  80 steps in 2 segment(s)"),
        "{summary}"
    );
    assert!(
        summary.contains("changed    train.steps 40 -> 80 at step 40"),
        "{summary}"
    );

    // Anything outside the safe set is refused with the key and both values.
    let other = megamoe(
        &dir,
        &[
            "train",
            "--resume",
            "r",
            "--steps",
            "90",
            "--set",
            "optim.lr=0.02",
        ],
    );
    let err = stderr(&other);
    assert_eq!(other.status.code(), Some(2), "{err}");
    assert!(
        err.contains("optim.lr is 0.01 in the checkpoint but 0.02 now"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cadence_changes_on_resume_are_recorded_and_take_effect() {
    let dir = scratch("cadence");
    let first = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--steps",
            "10",
            "--run-dir",
            "r",
        ],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let resumed = megamoe(
        &dir,
        &[
            "train",
            "--resume",
            "r",
            "--steps",
            "20",
            "--set",
            "train.checkpoint_every=5",
        ],
    );
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains("changed train.checkpoint_every 10 -> 5"),
        "{err}"
    );
    assert!(dir.join("r/checkpoints/ckpt-00000015").is_dir());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_warmup_longer_than_the_run_is_refused() {
    let dir = scratch("warmup");
    let out = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--set",
            "optim.warmup_steps=41",
            "--run-dir",
            "w",
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("optim.warmup_steps=41 must be <= train.steps=40"),
        "{err}"
    );
    assert!(!dir.join("w").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
