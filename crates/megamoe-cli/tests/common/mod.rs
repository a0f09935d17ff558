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

/// The micro model most CLI tests train (2 layers, the second MoE with 4 routed experts,
/// top-2; seconds per run), followed by the test's own sections (`[train]`, `[optim]`):
/// `const MICRO: &str = micro_config!(r#"[train] ..."#);`.
#[allow(unused_macros)] // not every CLI test binary trains the micro model
macro_rules! micro_config {
    ($sections:literal) => {
        concat!(
            r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
seq_len = 32

[moe]
routed_experts = 4
top_k = 2
expert_hidden = 32
first_dense_layers = 1
"#,
            $sections
        )
    };
}

/// A process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
