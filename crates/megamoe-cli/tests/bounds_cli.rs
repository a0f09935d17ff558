//! Huge sizes end to end: `plan`, `train` and `schedule` refuse what cannot
//! fit in memory with exit 2 and one named line, before allocating anything
//! (a run that tried would abort with rc 134 or take minutes).

mod common;

use common::BIN;
use std::path::PathBuf;
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("bounds", name, None)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(std::env::temp_dir())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run megamoe")
}

/// Exit 2, one line `error: ...` containing every needle.
fn assert_refused(args: &[&str], needles: &[&str]) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].chars().count() <= 240, "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: {n:?} not in {err}");
    }
}

/// The sizes, each with the field the error must name.
const HUGE: [(&str, &str); 7] = [
    ("model.vocab_size=100000000000", "model.vocab_size"),
    ("model.ffn_hidden=1000000000000", "model.ffn_hidden"),
    ("moe.expert_hidden=1000000000000", "moe.expert_hidden"),
    ("moe.routed_experts=1000000000", "moe.routed_experts"),
    ("train.global_batch=1000000000000", "tokens"),
    ("model.seq_len=100000000", "model.seq_len"),
    ("model.n_layers=1000000000000", "MoE layers"),
];

#[test]
fn plan_refuses_every_huge_size_naming_the_biggest_term() {
    for (set, field) in HUGE {
        assert_refused(
            &["plan", "--set", set],
            &["too big for memory", field, "RAM"],
        );
        assert_refused(
            &["plan", "--devices", "1", "--set", set],
            &["too big for memory", field, "--device-gib 80"],
        );
    }
}

#[test]
fn train_refuses_every_huge_size_before_creating_the_run_dir() {
    let dir = scratch("train");
    for (i, (set, field)) in HUGE.iter().enumerate() {
        let run_dir = dir.join(format!("run{i}"));
        let run_dir = run_dir.to_str().unwrap();
        assert_refused(
            &["train", "--run-dir", run_dir, "--steps", "1", "--set", set],
            &["too big for memory", field],
        );
        assert!(!std::path::Path::new(run_dir).exists(), "{set}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overflowing_mesh_and_batch_products_are_named() {
    assert_refused(
        &[
            "plan",
            "--set",
            "parallel.dp=4611686018427387904",
            "--set",
            "train.global_batch=4611686018427387904",
        ],
        &[
            "world size 4611686018427387904",
            "exceeds the planner's limit",
        ],
    );
    assert_refused(
        &["plan", "--set", "train.global_batch=4611686018427387904"],
        &[
            "tokens per step",
            "train.global_batch=4611686018427387904",
            "overflows",
        ],
    );
}

#[test]
fn train_names_the_parallel_keys_not_a_flag_it_does_not_have() {
    let dir = scratch("world");
    let run_dir = dir.join("run");
    let out = run(&[
        "train",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        "parallel.dp=2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("parallel=(pp 1 x dp 2"), "{err}");
    assert!(!err.contains("--devices"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--cuda-graph` on the CPU (also what `--world N` and MPI ranks run on) is refused,
/// not silently ignored, and no run directory is created.
#[test]
fn train_refuses_a_cuda_graph_without_a_gpu() {
    let dir = scratch("cuda-graph");
    let run_dir = dir.join("run");
    let rd = run_dir.to_str().unwrap();
    assert_refused(
        &["train", "--run-dir", rd, "--cuda-graph"],
        &["--cuda-graph", "--device cuda"],
    );
    assert!(!run_dir.exists(), "run dir created for a refused run");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn schedule_refuses_programs_that_cannot_fit_in_memory() {
    for kind in [&["--kind", "1f1b"][..], &["--compare"][..]] {
        let mut args = vec!["schedule", "--pp", "1000", "--microbatches", "100000"];
        args.extend_from_slice(kind);
        assert_refused(&args, &["300000000 actions", "more than", "RAM"]);
    }
}

#[test]
fn schedule_refuses_costs_for_a_stage_it_does_not_have() {
    let base = [
        "schedule",
        "--kind",
        "1f1b",
        "--pp",
        "4",
        "--microbatches",
        "8",
    ];
    let mut args = base.to_vec();
    args.extend(["--costs", "s99.F=2"]);
    assert_refused(&args, &["s99", "stage 99 does not exist", "0..3"]);
    // zbv has 2 stages per rank: s7 exists on pp 4.
    let out = run(&[
        "schedule",
        "--kind",
        "zbv",
        "--pp",
        "4",
        "--microbatches",
        "8",
        "--costs",
        "s7.F=2",
    ]);
    assert_eq!(out.status.code(), Some(0));
}
