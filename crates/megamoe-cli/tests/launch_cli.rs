//! `megamoe train` started by a process launcher (RANK / WORLD_SIZE, OMPI_COMM_WORLD_*):
//! a binary without the `mpi` feature refuses to run as one of N > 1 processes (exit 2, one
//! line, no run directory), and malformed launcher variables are named. The MPI runs
//! themselves are `tools/mpi_layouts.sh` and `tools/mpi_kill.sh` (CI runs them under mpirun).
#![allow(clippy::unwrap_used)]

mod common;

use common::{stderr, BIN};
use std::process::{Command, Output};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/tiny.toml");

/// `megamoe train` (2 steps) in a scratch directory with the launcher variables `env`;
/// returns the output and whether the run directory was created.
fn train(name: &str, extra: &[&str], env: &[(&str, &str)]) -> (Output, bool) {
    let dir = common::scratch_dir("launch-cli", name, None);
    let mut cmd = Command::new(BIN);
    cmd.current_dir(&dir)
        .args([
            "train",
            "--config",
            TINY,
            "--steps",
            "2",
            "--run-dir",
            "run",
        ])
        .args(["--peak-flops", "1e11", "--sample-tokens", "0"])
        .args(extra);
    for var in [
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "PMI_SIZE",
        "PMIX_SIZE",
        "WORLD_SIZE",
        "RANK",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run megamoe");
    let created = dir.join("run").exists();
    let _ = std::fs::remove_dir_all(&dir);
    (out, created)
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_be_one_of_n_processes() {
    for (name, env) in [
        ("generic", [("WORLD_SIZE", "2"), ("RANK", "1")]),
        (
            "openmpi",
            [("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0")],
        ),
    ] {
        let (out, created) = train(name, &["--set", "parallel.dp=2"], &env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(!created, "{name}: no run directory may be written");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
        let var = env[0].0;
        assert!(
            err.contains(&format!("{var}=2")) && err.contains("built without MPI"),
            "{name}: {err}"
        );
    }
}

#[test]
fn malformed_launcher_variables_are_named() {
    let (out, created) = train("bad-rank", &[], &[("WORLD_SIZE", "2"), ("RANK", "5")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!created);
    assert!(
        err.contains("RANK=5") && err.contains("below the world size"),
        "{err}"
    );
    let (out, _) = train("bad-size", &[], &[("WORLD_SIZE", "two")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("WORLD_SIZE=two"), "{err}");
}

#[test]
fn a_job_of_one_process_trains_as_usual() {
    let (out, created) = train("one", &[], &[("WORLD_SIZE", "1"), ("RANK", "0")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(created);
}
