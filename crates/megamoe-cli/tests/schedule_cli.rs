//! `megamoe schedule` end to end: the DualPipeV check, the output
//! formats, `--compare`, and one-line errors with exit code 2.

#![allow(clippy::unwrap_used)] // test helpers may unwrap, as tests may

use megamoe_pipeline::{stage_counts, validate, Chain, Schedule, StageMap};
use std::process::{Command, Output};

fn megamoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_megamoe"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(args: &[&str]) -> String {
    let out = megamoe(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dualpipev_pp4_m10_csv_validates_with_spec_counts() {
    let (p, m) = (4usize, 10usize);
    let csv = stdout(&[
        "schedule",
        "--kind",
        "dualpipev",
        "--pp",
        "4",
        "--microbatches",
        "10",
        "--format",
        "csv",
    ]);
    assert_eq!(csv.lines().count(), p, "one line per rank");
    let s = Schedule::from_compute_only(&csv, StageMap::v_shape(p), vec![Chain::linear(2 * p, m)])
        .unwrap();
    validate(&s).unwrap();
    // Stages 0..8 appear, stage r and 2P−1−r on rank r.
    for r in 0..p {
        let mut stages: Vec<usize> = s.ops_of(r).map(|o| o.stage).collect();
        stages.sort();
        stages.dedup();
        assert_eq!(stages, vec![r, 2 * p - 1 - r]);
    }
    // Expected I counts from the spec's phase table (H = P, h = r, n6 = r+1):
    // second stage: phase 3 gives P−r−1 I's; phase 6 runs B1 as I from
    // i = n6/2 on odd r, from i = n6/2 + 1 on even r.
    // first stage: phase 6 runs B0 as I from i = n6/2; phase 7 gives P−r−1 I's.
    let counts = stage_counts(&s);
    for r in 0..p {
        let n6 = r + 1;
        let second_zb = if r % 2 == 1 {
            n6 - n6 / 2
        } else {
            n6 - n6 / 2 - 1
        };
        let i_second = (p - r - 1) + second_zb;
        let i_first = (n6 - n6 / 2) + (p - r - 1);
        for (stage, i) in [(r, i_first), (2 * p - 1 - r, i_second)] {
            let c = counts[stage];
            assert_eq!(
                (c.f, c.i, c.w, c.b),
                (m, i, i, m - i),
                "stage {stage} on rank {r}"
            );
        }
    }
}

#[test]
fn dualpipev_peak_activations_are_2p_plus_1_on_every_rank() {
    let json = stdout(&[
        "schedule",
        "--kind",
        "dualpipev",
        "--pp",
        "4",
        "--microbatches",
        "10",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for r in ranks {
        assert_eq!(r["peak_activations"], 2 * 4 + 1);
    }
    assert_eq!(v["stage_map"], "0,1,2,3,3,2,1,0");
}

#[test]
fn chrome_format_is_json_with_trace_events_and_svg_is_an_svg() {
    let args = [
        "schedule",
        "--kind",
        "zb-h1",
        "--pp",
        "3",
        "--microbatches",
        "6",
    ];
    let chrome = stdout(&[&args[..], &["--format", "chrome"]].concat());
    let v: serde_json::Value = serde_json::from_str(&chrome).unwrap();
    let slices = v["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .count();
    assert_eq!(slices, 3 * 6 * 3, "3 ranks × 6 microbatches × (F, I, W)");
    let svg = stdout(&[&args[..], &["--format", "svg"]].concat());
    assert!(svg.starts_with("<svg") && svg.contains("rank 2"));
}

#[test]
fn output_file_receives_the_text() {
    let path = std::env::temp_dir().join(format!("megamoe_sched_{}.csv", std::process::id()));
    let p = path.to_str().unwrap();
    let printed = stdout(&[
        "schedule",
        "--kind",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "3",
        "--format",
        "csv",
    ]);
    stdout(&[
        "schedule",
        "--kind",
        "1f1b",
        "--pp",
        "2",
        "--microbatches",
        "3",
        "--format",
        "csv",
        "-o",
        p,
    ]);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), printed);
    // 1F1B, P = 2, M = 3 by hand: rank 0 warms up one F.
    assert_eq!(
        printed,
        "0F0,0F1,0B0,0F2,0B1,0B2\n1F0,1B0,1F1,1B1,1F2,1B2\n"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn compare_lists_every_kind() {
    let out = stdout(&["schedule", "--compare", "--pp", "4", "--microbatches", "8"]);
    for kind in [
        "gpipe",
        "1f1b",
        "interleaved",
        "zb-h1",
        "zbv",
        "dualpipe",
        "dualpipev",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(kind)),
            "{kind} missing:\n{out}"
        );
    }
}

#[test]
fn bad_input_is_one_line_on_stderr_and_exit_2() {
    for (args, needle) in [
        (
            vec!["--kind", "dualpipe", "--pp", "3", "--microbatches", "8"],
            "pp=3 must be even",
        ),
        (
            vec!["--kind", "2f2b", "--pp", "2", "--microbatches", "8"],
            "unknown schedule",
        ),
        (
            vec!["--kind", "1f1b", "--pp", "4", "--microbatches", "2"],
            "microbatches=2 must be >= 4",
        ),
        (
            vec![
                "--kind",
                "1f1b",
                "--pp",
                "2",
                "--microbatches",
                "2",
                "--costs",
                "F=x",
            ],
            "F=x",
        ),
        (
            vec!["--kind", "interleaved", "--pp", "4", "--microbatches", "6"],
            "multiple of pp=4",
        ),
        (
            vec!["--compare", "--pp", "0", "--microbatches", "4"],
            "pp=0 must be at least 1",
        ),
    ] {
        let out = megamoe(&[&["schedule"][..], &args[..]].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn help_teaches_kinds_and_examples() {
    let help = stdout(&["schedule", "--help"]);
    for needle in [
        "dualpipev",
        "OVERLAP_F_B",
        "Examples:",
        "--compare",
        "--costs",
    ] {
        assert!(help.contains(needle), "{needle} missing from --help");
    }
}
