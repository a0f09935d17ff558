//! Helpers shared by the CLI test binaries: the built binary, a fresh scratch
//! directory per test, and stderr as text.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Output;

/// The `megamoe` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_megamoe");

/// An empty directory `megamoe-<suite>-<pid>-<name>` under the system temp dir,
/// holding `micro.toml` when a config is given.
pub fn scratch_dir(suite: &str, name: &str, config: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("megamoe-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(text) = config {
        std::fs::write(dir.join("micro.toml"), text).unwrap();
    }
    dir
}

/// A process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
