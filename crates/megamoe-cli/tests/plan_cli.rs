//! `megamoe plan` end to end: the built binary over configs/tiny.toml and over
//! broken configs written to a temp dir. Every broken config must exit 2 with
//! one line on stderr naming the field — no panic, no backtrace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_megamoe");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run megamoe")
}

/// Writes `text` to a fresh file in the temp dir and returns its path.
fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("megamoe-plan-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// 8 layers, 8 heads / 4 KV heads, 8 experts top-2, global batch 16.
const BASE: &str = r#"[model]
vocab_size = 256
d_model = 64
n_layers = 8
n_heads = 8
n_kv_heads = 4
ffn_hidden = 128
seq_len = 32

[moe]
routed_experts = 8
top_k = 2

[parallel]
dp = 1
tp = 1
pp = 1
ep = 1
microbatches = 1
schedule = "1f1b"

[train]
global_batch = 16
"#;

fn set(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key} = ");
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                format!("{prefix}{value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "key {key} not in base");
    out.join("\n") + "\n"
}

fn assert_fails(name: &str, text: &str, extra: &[&str], needles: &[&str]) {
    let path = write_config(name, text);
    let mut args = vec!["plan", "--config", path.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: stderr {stderr}");
    assert!(out.stdout.is_empty(), "{name}: printed to stdout");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: not one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{name}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{name}: {stderr}"
    );
    for n in needles {
        assert!(lines[0].contains(n), "{name}: {:?} missing in {stderr}", n);
    }
}

#[test]
fn tiny_config_prints_every_section() {
    let cfg = repo_root().join("configs/tiny.toml");
    let out = run(&[
        "plan",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--devices",
        "1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for section in [
        "[mesh]",
        "[rank classes]",
        "[moe]",
        "experts per EP rank",
        "capacity per expert",
        "null-slot plan",
        "group routing",
        "[tensor parallel]",
        "[fsdp shards]",
        "[memory]",
        "dominant",
        "[oom triage]",
    ] {
        assert!(text.contains(section), "missing {section} in\n{text}");
    }
}

#[test]
fn process_groups_and_coordinates_are_printed() {
    // pp 2 x dp 2 x ep 2 = 8 ranks, rank = (pp·2 + dp)·2 + ep (hand-derived).
    let cfg = repo_root().join("configs/tiny.toml");
    let out = run(&[
        "plan",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--set",
        "parallel.pp=2",
        "--set",
        "parallel.dp=2",
        "--set",
        "parallel.ep=2",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "application order            tp -> pp -> fsdp -> ep",
        "[process groups]",
        "ep (size 2)                  [0, 1] [2, 3] [4, 5] [6, 7]",
        "pp (size 2)                  [0, 4] [1, 5] [2, 6] [3, 7]",
        "dense_dp (size 4)            [0, 1, 2, 3] [4, 5, 6, 7]",
        "expert_dp (size 2)           [0, 2] [1, 3] [4, 6] [5, 7]",
        "rank 6                       pp 1 dp 1 ep 0 cp 0 tp 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn sequence_parallel_is_printed() {
    let cfg = repo_root().join("configs/tiny.toml");
    for (sp, want) in [("false", "false"), ("true", "true")] {
        let out = run(&[
            "plan",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--set",
            "parallel.tp=2",
            "--set",
            &format!("parallel.sp={sp}"),
        ]);
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        let row = text
            .lines()
            .find(|l| l.trim_start().starts_with("sequence parallel"))
            .unwrap_or_else(|| panic!("no sequence parallel row in\n{text}"));
        assert_eq!(row.split_whitespace().last(), Some(want), "{row}");
    }
}

#[test]
fn tensor_parallel_groups_and_shard_shapes_are_printed() {
    // tiny: H 64, 4 query heads and 2 KV heads of D 16, F 256, shared Fs 128;
    // dp 2 x tp 2 = 4 ranks, tp fastest: TP groups [0, 1] [2, 3].
    let cfg = repo_root().join("configs/tiny.toml");
    let out = run(&[
        "plan",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--set",
        "parallel.tp=2",
        "--set",
        "parallel.dp=2",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in\n{text}"))
            .split_whitespace()
            .skip(1)
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        text.contains("tp (size 2)                  [0, 1] [2, 3]"),
        "{text}"
    );
    assert!(text.contains("[tp shards]"), "{text}");
    for (name, want) in [
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "64x64 32x64 rows:",
        ),
        (
            "model.layers.{i}.self_attn.k_proj.weight",
            "32x64 16x64 rows:",
        ),
        (
            "model.layers.{i}.self_attn.o_proj.weight",
            "64x64 64x32 columns:",
        ),
        ("model.layers.{i}.mlp.up_proj.weight", "256x64 128x64 rows:"),
        (
            "model.layers.{i}.mlp.down_proj.weight",
            "64x256 64x128 columns:",
        ),
        (
            "model.layers.{i}.mlp.shared_experts.up_proj",
            "128x64 64x64 rows:",
        ),
        ("model.layers.{i}.mlp.router.weight", "8x64 8x64 replicated"),
        ("model.embed_tokens.weight", "256x64 256x64 replicated"),
    ] {
        assert_eq!(line(name), want, "{name}");
    }
}

#[test]
fn tiny_config_json_parses() {
    let cfg = repo_root().join("configs/tiny.toml");
    let out = run(&["plan", "--config", cfg.to_str().expect("utf-8"), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["world"], 1);
    assert_eq!(v["plan"]["moe"]["routed_experts"], 8);
    assert!(v["memory"]["ranks"][0]["breakdown"]["params_gb"].is_number());
    assert!(v["memory"]["triage"]["dominant"].is_string());
    assert!(v["fsdp_shards"].as_array().is_some_and(|a| !a.is_empty()));
}

#[test]
fn every_shipped_config_plans() {
    for (name, devices) in [
        ("tiny", "1"),
        ("all_features", "1"),
        ("gpu_1b", "1"),
        ("mixtral_like", "4"),
        ("deepseek_v3_like", "4"),
    ] {
        let cfg = repo_root().join(format!("configs/{name}.toml"));
        let out = run(&[
            "plan",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--devices",
            devices,
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn set_overrides_are_applied_and_validated() {
    let cfg = repo_root().join("configs/tiny.toml");
    let cfg = cfg.to_str().expect("utf-8");
    let out = run(&["plan", "-c", cfg, "--set", "parallel.ep=2", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["plan"]["moe"]["experts_per_ep_rank"], 4);
    let out = run(&["plan", "-c", cfg, "--set", "parallel.ep=3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parallel.ep=3"));
}

#[test]
fn broken_configs_exit_2_with_one_named_line() {
    let cases: Vec<(&str, String, Vec<&str>, Vec<&str>)> = vec![
        (
            "ep",
            set(BASE, "ep", "3"),
            vec![],
            vec!["parallel.ep=3", "moe.routed_experts=8"],
        ),
        (
            "tp_heads",
            set(BASE, "tp", "3"),
            vec![],
            vec!["parallel.tp=3", "model.n_heads=8"],
        ),
        (
            "tp_kv",
            set(BASE, "tp", "8"),
            vec![],
            vec!["parallel.tp=8", "model.n_kv_heads=4"],
        ),
        (
            "pp",
            set(&set(BASE, "pp", "3"), "microbatches", "4"),
            vec![],
            vec!["model.n_layers=8", "parallel.pp=3"],
        ),
        (
            "rho_zero",
            BASE.replace("top_k = 2", "top_k = 2\nnull_rho = 0.0"),
            vec![],
            vec!["moe.null_rho=0", "(0, 1]"],
        ),
        (
            "rho_big",
            BASE.replace("top_k = 2", "top_k = 2\nnull_rho = 1.5"),
            vec![],
            vec!["moe.null_rho=1.5"],
        ),
        (
            "top_k",
            set(BASE, "top_k", "9"),
            vec![],
            vec!["moe.top_k=9", "moe.routed_experts=8"],
        ),
        (
            "groups",
            BASE.replace("top_k = 2", "top_k = 2\nn_groups = 3"),
            vec![],
            vec!["moe.n_groups=3"],
        ),
        (
            "topk_groups",
            BASE.replace("top_k = 2", "top_k = 2\nn_groups = 4\ntopk_groups = 5"),
            vec![],
            vec!["moe.topk_groups=5", "moe.n_groups=4"],
        ),
        (
            "dualpipe_odd",
            set(
                &set(&set(BASE, "schedule", "\"dualpipe\""), "pp", "1"),
                "microbatches",
                "4",
            ),
            vec![],
            vec!["parallel.pp=1", "even"],
        ),
        (
            "dualpipe_m",
            set(
                &set(&set(BASE, "schedule", "\"dualpipe\""), "pp", "2"),
                "microbatches",
                "2",
            ),
            vec![],
            vec!["parallel.microbatches=2", "2·parallel.pp"],
        ),
        (
            "world",
            BASE.to_string(),
            vec!["--devices", "4"],
            vec!["world size 1", "--devices=4"],
        ),
        (
            "unknown_key",
            BASE.replace("top_k = 2", "top_k = 2\nexperts = 4"),
            vec![],
            vec!["line 13", "moe.experts", "unknown field"],
        ),
        (
            "wrong_type",
            set(BASE, "ep", "\"two\""),
            vec![],
            vec!["line 18", "parallel.ep", "invalid type"],
        ),
        (
            "ep_dense",
            set(&set(BASE, "routed_experts", "0"), "ep", "2"),
            vec![],
            vec!["parallel.ep=2", "MoE"],
        ),
        (
            "microbatch",
            set(BASE, "dp", "3"),
            vec!["--devices", "3"],
            vec!["train.global_batch=16", "parallel.dp=3"],
        ),
        (
            "bad_set",
            BASE.to_string(),
            vec!["--set", "parallel.ep"],
            vec!["--set", "section.key=value"],
        ),
    ];
    for (name, text, extra, needles) in &cases {
        assert_fails(name, text, extra, needles);
    }
}

#[test]
fn missing_file_exits_2() {
    let out = run(&["plan", "--config", "/nonexistent/megamoe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/megamoe.toml"));
}
