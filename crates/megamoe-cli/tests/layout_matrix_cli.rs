//! The layout matrix through the built binary: `megamoe train --config configs/tiny.toml
//! --world N --set parallel.… --steps 8` writes the same per-step losses (f32, ≤ 1e-5
//! relative) as `--world 1` running the same 8 micro-batches of the global batch (same
//! micro-batch size), for every layout the trainer runs. One table, [`LAYOUTS`]; a row
//! names the layout, its world size and its `--set`s; `parallel.microbatches` is
//! derived so that dp · ep · microbatches = 8.
#![allow(clippy::unwrap_used)]

mod common;

use common::{stderr, BIN};
use std::path::Path;
use std::process::{Command, Output};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/tiny.toml");

/// Micro-batches of every step (global batch 16 → micro-batches of 2 sequences).
const MICRO: usize = 8;

/// (name, world, dp·ep, `--set`s).
const LAYOUTS: &[(&str, usize, usize, &[&str])] = &[
    ("dp2", 2, 2, &["parallel.dp=2"]),
    ("ep2", 2, 2, &["parallel.ep=2"]),
    ("dp2xep2", 4, 4, &["parallel.dp=2", "parallel.ep=2"]),
    (
        "dp2xtp2-fsdp3",
        4,
        2,
        &["parallel.dp=2", "parallel.tp=2", "parallel.fsdp=3"],
    ),
    (
        "dp2xtp2-sp",
        4,
        2,
        &["parallel.dp=2", "parallel.tp=2", "parallel.sp=true"],
    ),
    (
        "pp2-1f1b",
        2,
        1,
        &["parallel.pp=2", "parallel.schedule=\"1f1b\""],
    ),
    (
        "pp2-interleaved",
        2,
        1,
        &[
            "parallel.pp=2",
            "parallel.schedule=\"interleaved\"",
            "parallel.vpp=2",
        ],
    ),
    (
        "pp2-zbh1",
        2,
        1,
        &["parallel.pp=2", "parallel.schedule=\"zb-h1\""],
    ),
    (
        "pp2-zbv",
        2,
        1,
        &["parallel.pp=2", "parallel.schedule=\"zbv\""],
    ),
    (
        "pp2-dualpipev",
        2,
        1,
        &["parallel.pp=2", "parallel.schedule=\"dualpipev\""],
    ),
    (
        "pp4-dualpipe",
        4,
        1,
        &["parallel.pp=4", "parallel.schedule=\"dualpipe\""],
    ),
    (
        "dp2xpp2-fsdp2",
        4,
        2,
        &[
            "parallel.dp=2",
            "parallel.pp=2",
            "parallel.fsdp=2",
            "parallel.schedule=\"1f1b\"",
        ],
    ),
    (
        "dp2xpp2-fsdp3-zbh1",
        4,
        2,
        &[
            "parallel.dp=2",
            "parallel.pp=2",
            "parallel.fsdp=3",
            "parallel.schedule=\"zb-h1\"",
        ],
    ),
    (
        "pp2xtp2-dualpipev",
        4,
        1,
        &[
            "parallel.pp=2",
            "parallel.tp=2",
            "parallel.schedule=\"dualpipev\"",
        ],
    ),
    (
        "dp2xep2xpp2-1f1b",
        8,
        4,
        &[
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.pp=2",
            "parallel.schedule=\"1f1b\"",
        ],
    ),
];

fn train(dir: &Path, run: &str, world: usize, sets: &[String]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .args(["train", "--config", TINY, "--steps", "8", "--run-dir", run])
        .args(["--peak-flops", "1e11", "--sample-tokens", "0"])
        .args(["--world", &world.to_string()]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().expect("run megamoe")
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
fn every_layout_writes_the_losses_of_one_rank() {
    let dir = common::scratch_dir("layout-matrix", "all", None);
    let one = train(&dir, "one", 1, &[format!("parallel.microbatches={MICRO}")]);
    assert!(one.status.success(), "{}", stderr(&one));
    let want = losses(&dir.join("one"));
    assert_eq!(want.len(), 8);
    assert!(
        (want[7].1 - want[0].1).abs() > 1e-3,
        "the loss moves: {want:?}"
    );
    let mut failed = Vec::new();
    for &(name, world, data_ranks, sets) in LAYOUTS {
        let mut all: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        all.push(format!("parallel.microbatches={}", MICRO / data_ranks));
        let out = train(&dir, name, world, &all);
        if !out.status.success() {
            failed.push(format!("{name}: exit {:?}: {}", out.status, stderr(&out)));
            continue;
        }
        let ranks = format!("{world} thread ranks");
        assert!(stderr(&out).contains(&ranks), "{name}: {}", stderr(&out));
        let got = losses(&dir.join(name));
        let worst = got
            .iter()
            .zip(&want)
            .map(|((s, g), (s2, w))| {
                assert_eq!(s, s2, "{name}: step records in order");
                (g - w).abs() / w.abs()
            })
            .fold(0.0, f64::max);
        eprintln!("{name} (--world {world}): max rel loss diff {worst:.2e}");
        if got.len() != want.len() || worst > 1e-5 {
            failed.push(format!("{name}: {got:?} vs one rank {want:?}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
