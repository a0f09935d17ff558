//! `megamoe train` and `megamoe report` end to end through the built binary, on a
//! micro config: `--steps` is a total and `--resume` continues bit-identically; the
//! run directory holds metrics, checkpoints, config and summary; `report` writes
//! plots; bad inputs exit 2 with one line; the NaN/Inf guard exits 1.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::{stderr, BIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// 2 layers (layer 1 MoE, 4 experts top-2), 4 sequences of 32 tokens per step.
const MICRO: &str = micro_config!(
    r#"
[train]
global_batch = 4
steps = 40
eval_every = 3
eval_batches = 1
log_every = 2

[optim]
lr = 1e-2
warmup_steps = 2
"#
);

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("train-cli", name, Some(MICRO))
}

fn megamoe(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run megamoe")
}

/// Total loss of every step record, last record per step, by step.
fn step_losses(run_dir: &Path) -> std::collections::BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "step" {
            out.insert(
                v["step"].as_u64().unwrap(),
                v["loss"]["total"].as_f64().unwrap(),
            );
        }
    }
    out
}

#[test]
fn resume_continues_bit_identically_and_report_writes_plots() {
    let dir = scratch("resume");
    let cfg = ["train", "--config", "micro.toml", "--sample-tokens", "4"];
    let straight = megamoe(
        &dir,
        &[&cfg[..], &["--steps", "6", "--run-dir", "a"]].concat(),
    );
    assert!(straight.status.success(), "{}", stderr(&straight));
    let first = megamoe(
        &dir,
        &[&cfg[..], &["--steps", "3", "--run-dir", "b"]].concat(),
    );
    assert!(first.status.success(), "{}", stderr(&first));
    // --resume takes the run's own config; --steps is the total, not a count to add.
    let resumed = megamoe(&dir, &["train", "--resume", "b", "--steps", "6"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));

    let (a, b) = (step_losses(&dir.join("a")), step_losses(&dir.join("b")));
    assert_eq!(
        a.keys().copied().collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(
        b.keys().copied().collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    for s in 4..=6 {
        assert_eq!(
            a[&s].to_bits(),
            b[&s].to_bits(),
            "step {s}: {} vs {}",
            a[&s],
            b[&s]
        );
    }
    for f in ["config.toml", "summary.txt", "checkpoints/latest"] {
        assert!(dir.join("b").join(f).is_file(), "{f}");
    }
    assert!(dir.join("b/checkpoints/ckpt-00000003/state.json").is_file());
    assert!(dir
        .join("b/checkpoints/ckpt-00000006/model.safetensors")
        .is_file());

    let report = megamoe(&dir, &["report", "b"]);
    assert!(report.status.success(), "{}", stderr(&report));
    assert!(String::from_utf8_lossy(&report.stdout).contains("last/first"));
    assert!(dir.join("b/report/loss.svg").is_file());
    assert!(dir.join("b/report/expert_load.svg").is_file());
}

#[test]
fn bad_inputs_exit_2_with_one_line_and_touch_nothing() {
    let dir = scratch("bad");
    let cases: [(&[&str], &str); 4] = [
        (&["train", "--data", "no/such/file.txt"], "no/such/file.txt"),
        (&["train", "--resume", "no_run"], "no_run"),
        (
            &[
                "train",
                "--config",
                "micro.toml",
                "--set",
                "train.global_batch=0",
            ],
            "global_batch",
        ),
        (&["report", "no_run"], "no_run"),
    ];
    for (args, needle) in cases {
        let o = megamoe(&dir, args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(
        !dir.join("runs").exists(),
        "a failed start leaves no run directory"
    );

    // A fresh run into a directory that holds a run is refused.
    let ok = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--steps",
            "1",
            "--run-dir",
            "r",
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let again = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--steps",
            "2",
            "--run-dir",
            "r",
        ],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("--resume r"), "{}", stderr(&again));
}

#[test]
fn nonfinite_guard_stops_the_run_with_exit_1() {
    let dir = scratch("nan");
    // lr 1e30 turns the weights to ~1e30 after the first update; every later loss
    // overflows, the guard skips those updates and stops after 1 + 1 of them.
    let o = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--steps",
            "10",
            "--run-dir",
            "n",
            "--set",
            "optim.lr=1e30",
            "--set",
            "optim.min_lr=0",
            "--set",
            "optim.grad_clip=1e30",
            "--set",
            "train.max_nonfinite_steps=1",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("train.max_nonfinite_steps=1"), "{err}");
    assert!(err.contains("SKIPPED"), "{err}");
    assert!(!dir.join("n/checkpoints/latest").exists());
}
