//! `megamoe train --world N` through the built binary: N thread ranks (dp, ep, dp×ep, tp) write
//! the same per-step losses as one rank running the same micro-batches (same micro-batch
//! size), a failed rank makes the command exit non-zero naming it, and layouts the trainer
//! cannot run are refused by name.
#![allow(clippy::unwrap_used)]

mod common;

use common::{stderr, BIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/tiny.toml");

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("world-cli", name, None)
}

fn train(dir: &Path, run: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .args(["train", "--config", TINY, "--steps", "8", "--run-dir", run])
        .args(["--peak-flops", "1e11"])
        .args(extra);
    if !extra.contains(&"--sample-tokens") {
        cmd.args(["--sample-tokens", "0"]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run megamoe")
}

/// The generated text of the run's sample record.
fn sample(run: &Path) -> String {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["kind"] == "sample")
        .map(|r| r["text"].as_str().unwrap().to_string())
        .unwrap()
}

/// (step, total loss) of every step record.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"]["total"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn world_2_data_parallel_writes_the_losses_of_one_rank() {
    let dir = scratch("dp2");
    let one = train(&dir, "one", &["--set", "parallel.microbatches=2"], &[]);
    assert!(one.status.success(), "{}", stderr(&one));
    let two = train(
        &dir,
        "two",
        &["--world", "2", "--set", "parallel.dp=2"],
        &[],
    );
    assert!(two.status.success(), "{}", stderr(&two));
    assert!(stderr(&two).contains("2 thread ranks"), "{}", stderr(&two));
    let (want, got) = (losses(&dir.join("one")), losses(&dir.join("two")));
    assert_eq!(want.len(), 8);
    assert_eq!(got.len(), 8, "rank 0 writes one record per step");
    assert!(
        (want[7].1 - want[0].1).abs() > 1e-3,
        "the loss moves: {want:?}"
    );
    for ((s, w), (s2, g)) in want.iter().zip(&got) {
        assert_eq!(s, s2);
        let rel = (g - w).abs() / w.abs();
        assert!(
            rel <= 1e-5,
            "step {s}: --world 2 loss {g} vs one rank {w} (rel {rel:e})"
        );
    }
    assert!(dir.join("two/checkpoints/ckpt-00000008").is_dir());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn world_2_tensor_parallel_writes_the_losses_of_one_rank() {
    // tp ranks read the same micro-batches: one rank runs the same single micro-batch.
    let dir = scratch("tp2");
    let one = train(&dir, "one", &[], &[]);
    assert!(one.status.success(), "{}", stderr(&one));
    let two = train(
        &dir,
        "two",
        &["--world", "2", "--set", "parallel.tp=2"],
        &[],
    );
    assert!(two.status.success(), "{}", stderr(&two));
    let (want, got) = (losses(&dir.join("one")), losses(&dir.join("two")));
    assert_eq!(want.len(), 8);
    assert_eq!(got.len(), 8, "rank 0 writes one record per step");
    assert!(
        (want[7].1 - want[0].1).abs() > 1e-3,
        "the loss moves: {want:?}"
    );
    for ((s, w), (s2, g)) in want.iter().zip(&got) {
        assert_eq!(s, s2);
        let rel = (g - w).abs() / w.abs();
        assert!(
            rel <= 1e-5,
            "step {s}: --world 2 tp 2 loss {g} vs one rank {w} (rel {rel:e})"
        );
    }
    // the checkpoint holds the one-rank layout (TP slices gathered)
    assert!(dir.join("two/checkpoints/ckpt-00000008").is_dir());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The held-out loss of every eval record.
fn evals(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "eval")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn world_2_pipeline_writes_the_losses_of_one_rank() {
    let dir = scratch("pp2");
    let m4 = ["--set", "parallel.microbatches=4"];
    let one = train(&dir, "one", &m4, &[]);
    assert!(one.status.success(), "{}", stderr(&one));
    let want = losses(&dir.join("one"));
    assert!((want[7].1 - want[0].1).abs() > 1e-3, "{want:?}");
    for schedule in ["1f1b", "dualpipev"] {
        let run = format!("pp2-{schedule}");
        let kind = format!("parallel.schedule=\"{schedule}\"");
        let args = [
            &m4[..],
            &["--world", "2", "--set", "parallel.pp=2", "--set", &kind],
        ]
        .concat();
        let out = train(&dir, &run, &args, &[]);
        assert!(out.status.success(), "{schedule}: {}", stderr(&out));
        let got = losses(&dir.join(&run));
        assert_eq!(got.len(), 8, "{schedule}: one record per step");
        for ((s, w), (s2, g)) in want.iter().zip(&got) {
            assert_eq!(s, s2);
            let rel = (g - w).abs() / w.abs();
            assert!(
                rel <= 1e-5,
                "{schedule} step {s}: {g} vs one rank {w} (rel {rel:e})"
            );
        }
        // The held-out loss after the run: every rank holds the whole updated model.
        let (e1, e2) = (evals(&dir.join("one")), evals(&dir.join(&run)));
        assert_eq!(e1.len(), e2.len());
        for (w, g) in e1.iter().zip(&e2) {
            assert!(
                (g - w).abs() / w.abs() <= 1e-5,
                "{schedule} eval {g} vs {w}"
            );
        }
        assert!(dir.join(&run).join("checkpoints/ckpt-00000008").is_dir());
        // Measured busy / idle per pipeline rank next to the simulator's prediction, and
        // the summary names the layout and each rank's time.
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(&run).join("pipeline.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["schedule"], schedule);
        assert_eq!(report["steps"], 8);
        let ranks = report["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), 2);
        for r in ranks {
            assert!(r["busy_s"].as_f64().unwrap() > 0.0, "{r}");
            let predicted = r["predicted_idle_fraction"].as_f64().unwrap();
            assert!((0.0..1.0).contains(&predicted), "{r}");
        }
        let summary = std::fs::read_to_string(dir.join(&run).join("summary.txt")).unwrap();
        assert!(
            summary.contains("layout     2 thread ranks: 2 = pp 2"),
            "{summary}"
        );
        assert!(summary.contains("rank 1     step time"), "{summary}");
        assert!(summary.contains("pipeline   pp rank 1: busy"), "{summary}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn world_ep_and_sharded_layouts_write_the_losses_of_one_rank() {
    let dir = scratch("ep");
    for (i, (world, sets, micro)) in [
        (
            "2",
            vec!["--set", "parallel.ep=2"],
            "parallel.microbatches=2",
        ),
        (
            "2",
            vec!["--set", "parallel.dp=2", "--set", "parallel.fsdp=2"],
            "parallel.microbatches=2",
        ),
        (
            "4",
            vec!["--set", "parallel.dp=4", "--set", "parallel.fsdp=3"],
            "parallel.microbatches=4",
        ),
        (
            "4",
            vec!["--set", "parallel.dp=2", "--set", "parallel.ep=2"],
            "parallel.microbatches=4",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let sampled = ["--sample-tokens", "8"];
        let one = train(
            &dir,
            &format!("one{i}"),
            &["--set", micro, sampled[0], sampled[1]],
            &[],
        );
        assert!(one.status.success(), "{}", stderr(&one));
        let mut args = vec!["--world", world, sampled[0], sampled[1]];
        args.extend(&sets);
        let run = format!("run{i}");
        let out = train(&dir, &run, &args, &[]);
        assert!(out.status.success(), "{sets:?}: {}", stderr(&out));
        let (want, got) = (
            losses(&dir.join(format!("one{i}"))),
            losses(&dir.join(&run)),
        );
        assert_eq!(got.len(), 8);
        for ((s, w), (_, g)) in want.iter().zip(&got) {
            let rel = (g - w).abs() / w.abs();
            assert!(
                rel <= 1e-5,
                "{sets:?} step {s}: {g} vs one rank {w} (rel {rel:e})"
            );
        }
        assert!(dir.join(&run).join("checkpoints/ckpt-00000008").is_dir());
        // generation runs through the expert-parallel layers on every rank
        assert_eq!(
            sample(&dir.join(&run)),
            sample(&dir.join(format!("one{i}")))
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_rank_makes_train_world_exit_non_zero_naming_it() {
    let dir = scratch("fault");
    let out = train(
        &dir,
        "run",
        &["--world", "2", "--set", "parallel.dp=2"],
        &[("MEGAMOE_RANK_FAULT", "1@3")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("rank 0: all_reduce aborted: rank 1 failed"),
        "{err}"
    );
    assert!(err.contains("rank 1 failed first"), "{err}");
    // Pipeline ranks: rank 0 waits on rank 1's activations or gradients, and stops.
    let out = train(
        &dir,
        "pp",
        &[
            "--world",
            "2",
            "--set",
            "parallel.pp=2",
            "--set",
            "parallel.microbatches=2",
        ],
        &[("MEGAMOE_RANK_FAULT", "1@3")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("rank 1 failed first"), "{err}");
    assert!(err.contains("rank 1 failed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fault_in_the_writing_rank_0_stops_every_rank_naming_it() {
    let dir = scratch("fault0");
    let out = train(
        &dir,
        "run",
        &["--world", "2", "--set", "parallel.dp=2"],
        &[("MEGAMOE_RANK_FAULT", "0@3")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("rank 0: injected fault before step 3"),
        "{err}"
    );
    assert!(err.contains("aborted: rank 0 failed"), "{err}");
    assert!(err.contains("rank 0 failed first"), "{err}");
    // rank 0 wrote the two steps before the fault, and no checkpoint
    let steps: Vec<u64> = losses(&dir.join("run")).iter().map(|s| s.0).collect();
    assert_eq!(steps, [1, 2]);
    assert!(!dir.join("run/checkpoints/ckpt-00000002").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn layouts_train_world_cannot_run_are_refused_by_name() {
    let dir = scratch("refuse");
    for (args, want) in [
        (
            vec!["--world", "3", "--set", "parallel.dp=2"],
            "--world 3 must equal",
        ),
        (
            vec![
                "--world",
                "4",
                "--set",
                "parallel.pp=2",
                "--set",
                "parallel.cp=2",
            ],
            "parallel.pp=2",
        ),
        (
            vec![
                "--world",
                "2",
                "--set",
                "parallel.tp=2",
                "--set",
                "parallel.sp=true",
                "--set",
                "gateskip.enabled=true",
            ],
            "gateskip",
        ),
        (vec!["--world", "0"], "--world 0"),
        (vec!["--set", "parallel.dp=2"], "--world N"),
    ] {
        let out = train(&dir, "run", &args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(
            !dir.join("run/metrics.jsonl").exists(),
            "{args:?}: nothing written"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `megamoe train ARGS --peak-flops 1e11 --sample-tokens 0` in `dir`.
fn megamoe(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .args(["--peak-flops", "1e11", "--sample-tokens", "0"])
        .output()
        .expect("run megamoe")
}

#[test]
fn a_world_checkpoint_resumes_on_one_rank_with_the_losses_of_the_uninterrupted_run() {
    let dir = scratch("resume");
    for (i, (world, sets, micro)) in [
        (
            "4",
            ["parallel.dp=2", "parallel.ep=2"],
            "parallel.microbatches=4",
        ),
        (
            "2",
            ["parallel.dp=2", "parallel.fsdp=2"],
            "parallel.microbatches=2",
        ),
        (
            "2",
            ["parallel.pp=2", "parallel.microbatches=4"],
            "parallel.microbatches=4",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let one = train(&dir, &format!("one{i}"), &["--set", micro], &[]);
        assert!(one.status.success(), "{}", stderr(&one));
        let run = format!("run{i}");
        let first = megamoe(
            &dir,
            &[
                "train",
                "--config",
                TINY,
                "--steps",
                "4",
                "--run-dir",
                &run,
                "--world",
                world,
                "--set",
                sets[0],
                "--set",
                sets[1],
            ],
        );
        assert!(first.status.success(), "{sets:?}: {}", stderr(&first));
        // the checkpoint is layout-free: one rank takes it with the same micro-batches
        let rest = megamoe(
            &dir,
            &[
                "train",
                "--resume",
                &run,
                "--steps",
                "8",
                "--set",
                "parallel.dp=1",
                "--set",
                "parallel.ep=1",
                "--set",
                "parallel.pp=1",
                "--set",
                "parallel.fsdp=0",
                "--set",
                micro,
            ],
        );
        assert!(rest.status.success(), "{sets:?}: {}", stderr(&rest));
        assert!(
            stderr(&rest).contains("resume: changed parallel."),
            "{}",
            stderr(&rest)
        );
        let (want, got) = (
            losses(&dir.join(format!("one{i}"))),
            losses(&dir.join(&run)),
        );
        assert_eq!(
            got.len(),
            8,
            "{sets:?}: 4 steps under the layout, 4 resumed"
        );
        for ((s, w), (s2, g)) in want.iter().zip(&got) {
            assert_eq!(s, s2);
            let rel = (g - w).abs() / w.abs();
            assert!(
                rel <= 1e-5,
                "{sets:?} step {s}: {g} vs uninterrupted one rank {w} (rel {rel:e})"
            );
        }
        // a micro-batch count that changes the step's micro-batches is refused by name
        let bad = megamoe(
            &dir,
            &[
                "train",
                "--resume",
                &run,
                "--steps",
                "9",
                "--set",
                "parallel.microbatches=1",
            ],
        );
        assert!(!bad.status.success());
        assert!(
            stderr(&bad).contains("parallel.microbatches is"),
            "{}",
            stderr(&bad)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dp2_ep2_checkpoint_resumes_under_world_layouts_with_the_losses_of_one_rank() {
    let dir = scratch("resume-world");
    let m4 = ["--set", "parallel.microbatches=4"];
    let one = train(&dir, "one", &m4, &[]);
    assert!(one.status.success(), "{}", stderr(&one));
    let want = losses(&dir.join("one"));
    let first = megamoe(
        &dir,
        &[
            "train",
            "--config",
            TINY,
            "--steps",
            "4",
            "--run-dir",
            "dp2ep2",
            "--world",
            "4",
            "--set",
            "parallel.dp=2",
            "--set",
            "parallel.ep=2",
            "--set",
            "parallel.microbatches=1",
        ],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    // Each resume continues a copy of the dp2 x ep2 run under another layout.
    for (name, world, sets) in [
        (
            "pp2-dualpipev",
            "2",
            vec![
                "parallel.dp=1",
                "parallel.ep=1",
                "parallel.pp=2",
                "parallel.schedule=\"dualpipev\"",
                "parallel.microbatches=4",
            ],
        ),
        (
            "ep2",
            "2",
            vec!["parallel.dp=1", "parallel.ep=2", "parallel.microbatches=2"],
        ),
        (
            "dp2ep2",
            "4",
            vec!["parallel.dp=2", "parallel.ep=2", "parallel.microbatches=1"],
        ),
    ] {
        let run = dir.join(name);
        if name != "dp2ep2" {
            copy_dir(&dir.join("dp2ep2"), &run);
        }
        let mut args = vec!["train", "--resume", name, "--steps", "8", "--world", world];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let out = megamoe(&dir, &args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let got = losses(&run);
        assert_eq!(got.len(), 8, "{name}: 4 steps under dp2 x ep2, 4 resumed");
        for ((s, w), (s2, g)) in want.iter().zip(&got) {
            assert_eq!(s, s2);
            let rel = (g - w).abs() / w.abs();
            assert!(
                rel <= 1e-5,
                "{name} step {s}: {g} vs uninterrupted one rank {w} (rel {rel:e})"
            );
        }
        assert!(run.join("checkpoints/ckpt-00000008").is_dir(), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Copies the directory tree `from` to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else if e.file_name() != ".lock" {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
