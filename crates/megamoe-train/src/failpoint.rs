//! Crash-test failpoints: named points between the file operations of a checkpoint
//! commit (and other run-directory writes) where a test can kill the process.
//!
//! Set `MEGAMOE_FAILPOINT=<name>` (every time the point is reached) or
//! `MEGAMOE_FAILPOINT=<name>@<step>` (only while saving or writing `step`) and the
//! process aborts there, exactly as `kill -9` would: no destructor runs, nothing is
//! flushed. Unset (the normal case) every point is one load of a cached `None`.
//! The names are listed in [`POINTS`]; an unknown name is ignored with a warning.

use std::sync::OnceLock;

/// Environment variable naming the failpoint to trigger.
pub const FAILPOINT_ENV: &str = "MEGAMOE_FAILPOINT";

/// Every failpoint, in the order a checkpoint save reaches them.
pub const POINTS: &[&str] = &[
    "checkpoint.tmp_created",
    "checkpoint.model_written",
    "checkpoint.optimizer_written",
    "checkpoint.state_written",
    "checkpoint.manifest_written",
    "checkpoint.shard_written",
    "checkpoint.index_written",
    "checkpoint.old_moved",
    "checkpoint.renamed",
    "checkpoint.latest_written",
    "file.partial_written",
    "metrics.step_written",
];

/// The failpoints only a sharded save (a distributed run's) passes.
pub const SHARDED_ONLY: &[&str] = &["checkpoint.shard_written", "checkpoint.index_written"];

/// The failpoints only a one-rank save passes.
pub const ONE_RANK_ONLY: &[&str] = &[
    "checkpoint.model_written",
    "checkpoint.optimizer_written",
    "checkpoint.manifest_written",
];

fn armed() -> Option<&'static (String, Option<u64>)> {
    static ARMED: OnceLock<Option<(String, Option<u64>)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(FAILPOINT_ENV).ok()?;
            let (name, step) = match spec.split_once('@') {
                Some((n, s)) => (n.to_string(), Some(s.parse::<u64>().ok()?)),
                None => (spec, None),
            };
            if !POINTS.contains(&name.as_str()) {
                log::warn!("{FAILPOINT_ENV}={name}: no such failpoint; ignored");
                return None;
            }
            Some((name, step))
        })
        .as_ref()
}

/// Aborts the process if `name` is the armed failpoint (and `step` matches, when the
/// spec names one).
pub(crate) fn hit(name: &str, step: u64) {
    if let Some((armed, at)) = armed() {
        if armed == name && at.is_none_or(|s| s == step) {
            eprintln!("{FAILPOINT_ENV}: aborting at {name} (step {step})");
            std::process::abort();
        }
    }
}
