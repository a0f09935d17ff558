//! `megamoe train` under crashes and contention, through the built binary: a kill
//! at every failpoint of the checkpoint commit (and before the first checkpoint)
//! followed by `--resume` gives the losses of an uninterrupted run with one metrics
//! record per step; one process per run directory; non-finite weights are never
//! checkpointed and `report` reads what such a run wrote.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::{stderr, BIN};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use megamoe_train::failpoint::{FAILPOINT_ENV, ONE_RANK_ONLY, POINTS, SHARDED_ONLY};

/// 2 layers (layer 1 MoE, 4 experts top-2), 4 sequences of 32 tokens per step, a
/// checkpoint every 2 steps.
const MICRO: &str = micro_config!(
    r#"
[train]
global_batch = 4
steps = 6
eval_every = 3
eval_batches = 1
checkpoint_every = 2

[optim]
lr = 1e-2
warmup_steps = 2
"#
);

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("crash-cli", name, Some(MICRO))
}

/// Removes a test's scratch directory once it passed (a failed one stays to look at).
fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// `megamoe ARGS` in `dir`, through `sh` to switch core dumps off: a failpoint
/// aborts the process.
fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("ulimit -c 0; exec \"$0\" \"$@\"")
        .arg(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove(FAILPOINT_ENV);
    c
}

fn megamoe(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run megamoe")
}

/// Step records of a run: step → (total loss, number of records of that step).
fn steps(run_dir: &Path) -> BTreeMap<u64, (f64, usize)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "step" {
            let e = out.entry(v["step"].as_u64().unwrap()).or_insert((0.0, 0));
            *e = (v["loss"]["total"].as_f64().unwrap(), e.1 + 1);
        }
    }
    out
}

/// Asserts `run` has one record for each of steps 1..=6, with `want`'s losses bit for bit.
fn assert_same_run(run: &Path, want: &BTreeMap<u64, (f64, usize)>, label: &str) {
    let got = steps(run);
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>(),
        "{label}"
    );
    for (s, (loss, n)) in &got {
        assert_eq!(*n, 1, "{label}: step {s} has {n} records");
        assert_eq!(loss.to_bits(), want[s].0.to_bits(), "{label}: step {s}");
    }
}

const TRAIN: [&str; 3] = ["train", "--config", "micro.toml"];

#[test]
fn a_kill_at_every_commit_point_then_resume_repeats_the_uninterrupted_run() {
    let dir = scratch("kill");
    let straight = megamoe(&dir, &[&TRAIN[..], &["--run-dir", "straight"]].concat());
    assert!(straight.status.success(), "{}", stderr(&straight));
    let want = steps(&dir.join("straight"));

    // `checkpoint.old_moved` is only passed when a save replaces a checkpoint of the
    // same step, which a resume never leaves to do (tests/checkpoint.rs covers it).
    let points = POINTS
        .iter()
        .filter(|p| **p != "checkpoint.old_moved" && !SHARDED_ONLY.contains(p));
    for (i, point) in points.enumerate() {
        let run = format!("k{i}");
        let label = format!("{point}@4");
        let killed = command(&dir, &[&TRAIN[..], &["--run-dir", &run]].concat())
            .env(FAILPOINT_ENV, &label)
            .output()
            .unwrap();
        assert!(
            !killed.status.success(),
            "{label}: the failpoint did not fire"
        );
        assert!(
            stderr(&killed).contains("aborting at"),
            "{label}: {}",
            stderr(&killed)
        );
        let resumed = megamoe(&dir, &["train", "--resume", &run]);
        assert!(resumed.status.success(), "{label}: {}", stderr(&resumed));
        assert_same_run(&dir.join(&run), &want, &label);
        // Nothing of the interrupted save is left behind.
        let left: Vec<String> = std::fs::read_dir(dir.join(&run).join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains('.'))
            .collect();
        assert!(left.is_empty(), "{label}: {left:?}");
    }
    cleanup(&dir);
}

/// The sharded save of `--world 2` with expert parallelism (each rank writes its experts,
/// rank 0 the index): a kill at each of its commit points (`@4`: after some shards, before
/// or after the index, ...) leaves no checkpoint of step 4 that resume would take unless
/// it was committed; `--resume` continues from the newest committed one with the losses
/// of the uninterrupted `--world 2` run, bit for bit.
#[test]
fn a_kill_at_every_sharded_commit_point_then_resume_repeats_the_uninterrupted_world_run() {
    let dir = scratch("kill-world");
    let layout = ["--world", "2", "--set", "parallel.ep=2"];
    let straight = megamoe(
        &dir,
        &[&TRAIN[..], &layout[..], &["--run-dir", "straight"]].concat(),
    );
    assert!(straight.status.success(), "{}", stderr(&straight));
    let want = steps(&dir.join("straight"));
    let ckpt4 = dir.join("straight/checkpoints/ckpt-00000004");
    assert!(
        ckpt4.join("index.json").is_file(),
        "a world run writes shards"
    );
    assert!(!ckpt4.join("model.safetensors").exists());

    let points = POINTS.iter().filter(|p| {
        **p != "checkpoint.old_moved" && **p != "metrics.step_written" && !ONE_RANK_ONLY.contains(p)
    });
    for (i, point) in points.enumerate() {
        let run = format!("w{i}");
        let label = format!("{point}@4");
        let killed = command(
            &dir,
            &[&TRAIN[..], &layout[..], &["--run-dir", &run]].concat(),
        )
        .env(FAILPOINT_ENV, &label)
        .output()
        .unwrap();
        assert!(
            !killed.status.success(),
            "{label}: the failpoint did not fire"
        );
        assert!(
            stderr(&killed).contains("aborting at"),
            "{label}: {}",
            stderr(&killed)
        );
        // Before the commit (the rename) step 4 is not a checkpoint: resume takes step 2.
        let committed = dir.join(&run).join("checkpoints/ckpt-00000004").is_dir();
        let before_commit = [
            "checkpoint.tmp_created",
            "checkpoint.shard_written",
            "checkpoint.state_written",
            "checkpoint.index_written",
            "file.partial_written",
        ];
        if before_commit.contains(point) {
            assert!(!committed, "{label}: a checkpoint of step 4 is visible");
        }
        let resumed = megamoe(
            &dir,
            &[&["train", "--resume", &run][..], &layout[..]].concat(),
        );
        assert!(resumed.status.success(), "{label}: {}", stderr(&resumed));
        if !committed {
            // The killed run logged steps 3 and 4: they are re-run from step 2.
            assert!(
                stderr(&resumed).contains("records after step 2"),
                "{label}: {}",
                stderr(&resumed)
            );
        }
        assert_same_run(&dir.join(&run), &want, &label);
        let left: Vec<String> = std::fs::read_dir(dir.join(&run).join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains('.'))
            .collect();
        assert!(left.is_empty(), "{label}: {left:?}");
    }
    cleanup(&dir);
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_step_0() {
    let dir = scratch("early");
    let straight = megamoe(&dir, &[&TRAIN[..], &["--run-dir", "straight"]].concat());
    assert!(straight.status.success(), "{}", stderr(&straight));
    let killed = command(&dir, &[&TRAIN[..], &["--run-dir", "r"]].concat())
        .env(FAILPOINT_ENV, "metrics.step_written@1")
        .output()
        .unwrap();
    assert!(!killed.status.success());
    assert_eq!(steps(&dir.join("r")).len(), 1);
    // A fresh run there is refused and points at --resume, which works.
    let fresh = megamoe(&dir, &[&TRAIN[..], &["--run-dir", "r"]].concat());
    assert_eq!(fresh.status.code(), Some(2));
    assert!(stderr(&fresh).contains("--resume r"), "{}", stderr(&fresh));
    let resumed = megamoe(&dir, &["train", "--resume", "r"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_same_run(&dir.join("r"), &steps(&dir.join("straight")), "early kill");
    cleanup(&dir);
}

#[test]
fn resuming_an_older_checkpoint_replaces_the_later_ones() {
    let dir = scratch("older");
    let first = megamoe(&dir, &[&TRAIN[..], &["--run-dir", "r"]].concat());
    assert!(first.status.success(), "{}", stderr(&first));
    let want = steps(&dir.join("r"));
    let again = megamoe(&dir, &["train", "--resume", "r/checkpoints/ckpt-00000002"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("ckpt-00000004.superseded"),
        "{}",
        stderr(&again)
    );
    assert_same_run(&dir.join("r"), &want, "resume from step 2");
    cleanup(&dir);
}

#[test]
fn a_locked_run_dir_is_refused_naming_the_holder() {
    let dir = scratch("lock");
    let held = megamoe_train::RunLock::acquire(&dir.join("r")).unwrap();
    for args in [
        &[&TRAIN[..], &["--run-dir", "r"]].concat(),
        &["train", "--resume", "r"][..].to_vec(),
    ] {
        let o = megamoe(&dir, args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let pid = format!("pid {}", std::process::id());
        assert!(
            err.contains(&pid) && err.contains("in use"),
            "{args:?}: {err}"
        );
    }
    drop(held);
    let o = megamoe(&dir, &[&TRAIN[..], &["--run-dir", "r"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    cleanup(&dir);
}

#[test]
fn two_runs_racing_for_one_dir_leave_one_consistent_run() {
    let dir = scratch("race");
    let spawn = || {
        command(&dir, &[&TRAIN[..], &["--run-dir", "r"]].concat())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let codes = [a.status.code(), b.status.code()];
    // Whichever started second finds the lock held, or (if the first was already
    // done) a directory holding a run: either way it exits 2 and writes nothing.
    assert!(
        codes == [Some(0), Some(2)] || codes == [Some(2), Some(0)],
        "{codes:?}: {} / {}",
        stderr(&a),
        stderr(&b)
    );
    let got = steps(&dir.join("r"));
    assert!(got.values().all(|(_, n)| *n == 1), "{got:?}");
    assert_eq!(got.len(), 6);
    cleanup(&dir);
}

#[test]
fn non_finite_weights_are_never_checkpointed_and_exit_1() {
    let dir = scratch("nan");
    // lr 1e308 makes every weight non-finite after the first update.
    for (run, extra) in [("n2", "2"), ("n6", "6")] {
        let o = megamoe(
            &dir,
            &[
                &TRAIN[..],
                &[
                    "--run-dir",
                    run,
                    "--steps",
                    extra,
                    "--set",
                    "optim.lr=1e308",
                ],
            ]
            .concat(),
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{run}: {err}");
        let last = err.lines().last().unwrap();
        assert!(
            last.contains("not finite") || last.contains("held-out loss is NaN"),
            "{err}"
        );
        let ckpts: Vec<_> = std::fs::read_dir(dir.join(run).join("checkpoints"))
            .unwrap()
            .collect();
        assert!(ckpts.is_empty(), "{run}: {ckpts:?}");
        // What the run wrote (an infinite lr, NaN losses) reads back.
        let report = megamoe(&dir, &["report", run]);
        assert!(report.status.success(), "{run}: {}", stderr(&report));
    }
    cleanup(&dir);
}

#[test]
fn bad_peak_flops_and_eval_batches_exit_2_before_anything_is_written() {
    let dir = scratch("flags");
    for (args, needle) in [
        (&["--peak-flops", "0"][..], "--peak-flops"),
        (&["--peak-flops", "nan"][..], "--peak-flops"),
        (&["--peak-flops", "inf"][..], "--peak-flops"),
        (&["--set", "train.eval_batches=0"][..], "train.eval_batches"),
    ] {
        let o = megamoe(&dir, &[&TRAIN[..], &["--run-dir", "r"], args].concat());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!dir.join("r").exists());
    cleanup(&dir);
}

#[test]
fn an_edited_state_json_is_skipped_naming_the_manifest_and_the_run_resumes_before_it() {
    let dir = scratch("edited");
    let first = megamoe(&dir, &[&TRAIN[..], &["--run-dir", "r"]].concat());
    assert!(first.status.success(), "{}", stderr(&first));
    let want = steps(&dir.join("r"));
    // Same length, another step: only the checksum can tell.
    let state = dir.join("r/checkpoints/ckpt-00000006/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"step\": 6,"), "{text}");
    std::fs::write(&state, text.replacen("\"step\": 6,", "\"step\": 4,", 1)).unwrap();

    let resumed = megamoe(&dir, &["train", "--resume", "r"]);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    let warning = err
        .lines()
        .find(|l| l.starts_with("warning: skipped"))
        .unwrap_or_else(|| panic!("no skip warning: {err}"));
    assert!(
        warning.contains("ckpt-00000006")
            && warning.contains("state.json is corrupt")
            && warning.contains("manifest.json records"),
        "{warning}"
    );
    // Steps 5-6 are re-run from ckpt-4: the same losses, one record each.
    assert_same_run(&dir.join("r"), &want, "edited state.json");

    // Naming the edited checkpoint directly is refused with the same reason.
    let direct = megamoe(
        &dir,
        &[
            "train",
            "--resume",
            "r/checkpoints/ckpt-00000006.superseded",
        ],
    );
    assert_eq!(direct.status.code(), Some(2), "{}", stderr(&direct));
    cleanup(&dir);
}
