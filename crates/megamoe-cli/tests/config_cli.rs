//! `megamoe config` and the settings `megamoe train` refuses rather than
//! ignores, through the built binary.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_megamoe");

fn megamoe(args: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(format!("megamoe-config-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Command::new(BIN)
        .current_dir(&dir)
        .args(args)
        .output()
        .expect("run megamoe")
}

#[test]
fn config_defaults_lists_every_section_with_defaults_and_meanings() {
    let o = megamoe(&["config", "--defaults"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    for section in [
        "[model]",
        "[moe]",
        "[gateskip]",
        "[flexidepth]",
        "[mtp]",
        "[parallel]",
        "[train]",
        "[optim]",
    ] {
        assert!(text.contains(section), "{section} missing:\n{text}");
    }
    let warmup = text
        .lines()
        .find(|l| l.starts_with("warmup_steps = "))
        .unwrap();
    assert!(
        warmup.contains("= 20") && warmup.contains("# Linear warmup"),
        "{warmup}"
    );
}

#[test]
fn config_prints_the_effective_config_with_overrides_applied() {
    let o = megamoe(&["config", "--set", "optim.lr=0.5"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("lr = 0.5"), "{text}");
    assert!(
        text.contains("max_nonfinite_steps = 3"),
        "defaults are filled in: {text}"
    );
}

#[test]
fn unsupported_dtype_and_recompute_exit_2_naming_the_key() {
    for (set, key) in [
        ("train.dtype=\"bf16\"", "train.dtype"),
        ("train.recompute=\"selective\"", "train.recompute"),
    ] {
        let o = megamoe(&["train", "--set", set, "--steps", "1", "--run-dir", "never"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{set}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(key),
            "{set}: {err}"
        );
    }
}

#[test]
fn run_name_must_be_a_plain_name() {
    let o = megamoe(&["train", "--run-name", "../x", "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--run-name"), "{err}");
}
