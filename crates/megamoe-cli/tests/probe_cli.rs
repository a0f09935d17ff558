//! `megamoe probe moe` end to end: the built binary on a committed MoE fixture (compared
//! with the PyTorch reference outputs), and on broken inputs — a missing tensor, a wrong
//! shape, a wrong dtype — which must exit 2 with one line naming tensor, expected and got.
#![allow(clippy::unwrap_used)] // test code

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use megamoe_tensor::{load_safetensors, save_safetensors, DType, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_megamoe");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../megamoe-moe/tests/fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("megamoe-probe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn probe(config: &Path, tensors: &Path, out: &Path) -> Output {
    Command::new(BIN)
        .args(["probe", "moe", "--config"])
        .arg(config)
        .arg("--tensors")
        .arg(tensors)
        .arg("--out")
        .arg(out)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

#[test]
fn probe_moe_matches_reference_fixture() {
    for name in ["shared_expert_gate", "null_slots_sigmoid_capacity"] {
        let f = fixtures();
        let out = tmp(&format!("{name}.got.safetensors"));
        let o = probe(
            &f.join(format!("{name}.toml")),
            &f.join(format!("{name}.in.safetensors")),
            &out,
        );
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got = load_safetensors(&out).unwrap();
        let want = load_safetensors(f.join(format!("{name}.out.safetensors"))).unwrap();
        let mut names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        let mut want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        want_names.sort();
        assert_eq!(
            names, want_names,
            "{name}: exactly the reference's tensor names"
        );
        for (n, w) in &want {
            let g = &got.iter().find(|(gn, _)| gn == n).unwrap().1;
            let (gv, wv) = (g.to_host_f32().unwrap(), w.to_host_f32().unwrap());
            if n == "tokens_per_expert" || n == "dropped" {
                assert_eq!(gv, wv, "{name}: {n}");
                continue;
            }
            let scale = wv.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = gv
                .iter()
                .zip(&wv)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-5 * scale,
                "{name}: {n} diff {diff:e} vs max {scale:e}"
            );
        }
    }
}

/// Writes the fixture's inputs with `edit` applied and runs the probe on them.
fn broken(tag: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> (i32, String) {
    let f = fixtures();
    let mut inputs = load_safetensors(f.join("softmax_k2_capacity_drop.in.safetensors")).unwrap();
    edit(&mut inputs);
    let path = tmp(&format!("{tag}.in.safetensors"));
    let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(&path, &named).unwrap();
    let o = probe(
        &f.join("softmax_k2_capacity_drop.toml"),
        &path,
        &tmp(&format!("{tag}.out.safetensors")),
    );
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{tag}: {stderr}");
    (o.status.code().unwrap_or(-1), stderr)
}

#[test]
fn probe_moe_broken_inputs_are_named_errors() {
    let (code, err) = broken("missing", |v| v.retain(|(n, _)| n != "experts.down_proj"));
    assert_eq!(code, 2);
    assert!(
        err.contains("experts.down_proj") && err.contains("missing") && err.contains("[8, 16, 12]"),
        "{err}"
    );

    let (code, err) = broken("shape", |v| {
        for (n, t) in v.iter_mut() {
            if n == "router.weight" {
                *t = t.narrow(0, 0, 7).unwrap();
            }
        }
    });
    assert_eq!(code, 2);
    assert!(
        err.contains("router.weight") && err.contains("[8, 16]") && err.contains("[7, 16]"),
        "{err}"
    );

    let (code, err) = broken("dtype", |v| {
        for (n, t) in v.iter_mut() {
            if n == "experts.up_proj" {
                *t = t.to_dtype(DType::BF16).unwrap();
            }
        }
    });
    assert_eq!(code, 2);
    assert!(
        err.contains("experts.up_proj") && err.contains("f32") && err.contains("bf16"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn probe_moe_warns_naming_an_input_with_nan_or_inf() {
    let (code, err) = broken("nan", |v| {
        for (n, t) in v.iter_mut() {
            if n == "x" {
                let mut x = t.to_host_f32().unwrap();
                x[5] = f32::NAN;
                x[9] = f32::INFINITY;
                *t = Tensor::from_vec_f32(x, t.dims().to_vec(), t.device()).unwrap();
            }
        }
    });
    assert_eq!(code, 0, "{err}");
    let warning = err
        .lines()
        .find(|l| l.starts_with("warning: input tensor `x`"))
        .unwrap_or_else(|| panic!("no warning naming x: {err}"));
    assert!(
        warning.contains("2 non-finite values") && warning.contains("index 5: NaN"),
        "{warning}"
    );
    assert!(!err.contains("`dy` has"), "only x is non-finite: {err}");
}

#[test]
fn probe_moe_refuses_to_write_over_its_input() {
    let f = fixtures();
    let input = tmp("same.in.safetensors");
    std::fs::copy(f.join("softmax_k2_capacity_drop.in.safetensors"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let dir = input.parent().unwrap();
    let link = dir.join("same.link.safetensors");
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(&input, &link).unwrap();
    // The same file by another spelling (`sub/..`), and by a hard link.
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for out in [dir.join("sub/../same.in.safetensors"), link] {
        let o = probe(&f.join("softmax_k2_capacity_drop.toml"), &input, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", out.display());
        assert!(err.contains("is the --tensors input file"), "{err}");
        assert_eq!(std::fs::read(&input).unwrap(), before, "input untouched");
    }
}
