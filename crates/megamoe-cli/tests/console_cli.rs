//! What a person sees from `megamoe train`, through the built binary: the run
//! header and column legend, step lines every `train.log_every` steps, the
//! whole-run summary across a resume, and the TensorBoard file.
#![allow(clippy::unwrap_used)]

mod common;

use common::BIN;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// 1 dense + 1 MoE layer, 4 sequences of 16 tokens per step, a line every 3 steps.
const MICRO: &str = r#"
[model]
vocab_size = 256
d_model = 16
n_layers = 2
n_heads = 2
ffn_hidden = 32
seq_len = 16

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 16
first_dense_layers = 1

[train]
global_batch = 4
steps = 8
eval_every = 4
eval_batches = 1
log_every = 3

[optim]
warmup_steps = 4
"#;

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("console", name, Some(MICRO))
}

fn megamoe(dir: &Path, args: &[&str]) -> Output {
    let o = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run megamoe");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn header_legend_interval_lines_and_a_summary_of_every_segment() {
    let dir = scratch("run");
    let first = megamoe(
        &dir,
        &[
            "train",
            "--config",
            "micro.toml",
            "--steps",
            "4",
            "--run-name",
            "r",
            "--sample-tokens",
            "0",
        ],
    );
    let err = String::from_utf8(first.stderr).unwrap();
    for needle in [
        "megamoe train | micro.toml | build ",
        "\nmodel    ",
        "\nbatch    4 sequences x 16 tokens = 64 tokens per step | steps 0 -> 4 | f32",
        "\noptim    adamw lr ",
        "\ndevice   cpu, ",
        "\nrun dir  runs/r",
        "\ncolumns: UTC time, step/total",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    // Lines at the first step, every 3rd step and the last.
    let steps: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit())) // "hh:mm:ss step ..."
        .filter_map(|l| l.split(" step ").nth(1))
        .map(|rest| rest.split('/').next().unwrap().trim())
        .collect();
    assert_eq!(steps, ["1", "3", "4"], "{err}");
    let run = dir.join("runs/r");
    let events = std::fs::read_dir(&run)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(events, 1);

    // Resume to step 8: the summary covers both segments, all 8 steps.
    let second = megamoe(
        &dir,
        &[
            "train",
            "--resume",
            "runs/r",
            "--steps",
            "8",
            "--sample-tokens",
            "0",
        ],
    );
    let out = String::from_utf8(second.stdout).unwrap();
    assert!(out.contains("this run   steps 4 -> 8"), "{out}");
    assert!(
        out.contains("whole run  8 steps in 2 segment(s), 512 tokens seen"),
        "{out}"
    );
    assert!(out.contains("best eval  "), "{out}");
    assert!(out.contains("final lr   "), "{out}");
    let summary = std::fs::read_to_string(run.join("summary.txt")).unwrap();
    assert!(summary.contains("8 steps in 2 segment(s)"), "{summary}");
}
