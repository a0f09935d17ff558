//! What a resume may change in the run config: the keys of
//! [`RESUME_SAFE_KEYS`] (run length and cadences) and the layout
//! ([`RESUME_LAYOUT_KEYS`], since a checkpoint holds the one-rank layout), nothing
//! else. Configs are compared key by key (`section.key`), so the error names the
//! first key that differs with both values.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// Keys a resumed run may set to another value than the checkpoint's: how long
/// the run is (`train.steps`, which is also the learning-rate horizon) and how
/// often it evaluates, checkpoints and logs. None of them changes a step's
/// arithmetic before the step they take effect at.
pub const RESUME_SAFE_KEYS: &[&str] = &[
    "train.steps",
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
];

/// Layout keys a resume may change: checkpoints are written in the one-rank layout
/// (every expert and its optimizer state gathered), so any layout can load one.
/// `parallel.microbatches` is not here: it may change only when the number of
/// micro-batches of a step, `dp·ep·microbatches`, stays the same (the global batch
/// is fixed, so the micro-batch size stays the same too).
pub const RESUME_LAYOUT_KEYS: &[&str] = &[
    "parallel.dp",
    "parallel.ep",
    "parallel.fsdp",
    "parallel.pp",
    "parallel.vpp",
    "parallel.tp",
    "parallel.sp",
    "parallel.cp",
    "parallel.schedule",
];

const MICROBATCHES: &str = "parallel.microbatches";

/// Micro-batches of one step over the data ranks: dp·ep·microbatches (absent = 1).
fn step_microbatches(config: &BTreeMap<String, String>) -> Option<u64> {
    ["parallel.dp", "parallel.ep", MICROBATCHES]
        .iter()
        .map(|k| config.get(*k).map_or(Some(1), |v| v.parse::<u64>().ok()))
        .try_fold(1u64, |acc, v| v.and_then(|v| acc.checked_mul(v)))
}

/// One key whose value a resume changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    /// `section.key`.
    pub key: String,
    /// The checkpoint's value (TOML), or `<absent>`.
    pub old: String,
    /// The value now (TOML), or `<absent>`.
    pub new: String,
}

const ABSENT: &str = "<absent>";

/// `section.key` → value as TOML text; a top-level key stands alone.
fn flatten(text: &str, path: &Path) -> Result<BTreeMap<String, String>> {
    let table: toml::Table = toml::from_str(text).map_err(|e| Error::CheckpointMalformed {
        path: path.to_path_buf(),
        reason: format!("config: {}", e.message()),
    })?;
    let mut out = BTreeMap::new();
    for (section, value) in table {
        match value {
            toml::Value::Table(keys) => {
                for (key, v) in keys {
                    out.insert(format!("{section}.{key}"), v.to_string());
                }
            }
            v => {
                out.insert(section, v.to_string());
            }
        }
    }
    Ok(out)
}

/// The keys `current` changes relative to `saved` (the config stored in the
/// checkpoint `state_path`), all in [`RESUME_SAFE_KEYS`] or [`RESUME_LAYOUT_KEYS`]
/// (or `parallel.microbatches` with the same dp·ep·microbatches); or
/// [`Error::CheckpointConfigMismatch`] naming the first other key that differs.
pub fn resume_config_changes(
    state_path: &Path,
    saved: &str,
    current: &str,
) -> Result<Vec<ConfigChange>> {
    let saved = flatten(saved, state_path)?;
    let current = flatten(current, state_path)?;
    let mut keys: Vec<&String> = saved.keys().chain(current.keys()).collect();
    keys.sort();
    keys.dedup();
    let same_step_microbatches = step_microbatches(&saved).is_some()
        && step_microbatches(&saved) == step_microbatches(&current);
    let mut changes = Vec::new();
    for key in keys {
        let (old, new) = (saved.get(key), current.get(key));
        if old == new {
            continue;
        }
        let change = ConfigChange {
            key: key.clone(),
            old: old.map_or(ABSENT, String::as_str).to_string(),
            new: new.map_or(ABSENT, String::as_str).to_string(),
        };
        let allowed = RESUME_SAFE_KEYS.contains(&key.as_str())
            || RESUME_LAYOUT_KEYS.contains(&key.as_str())
            || (key == MICROBATCHES && same_step_microbatches);
        if !allowed {
            return Err(Error::CheckpointConfigMismatch {
                path: state_path.to_path_buf(),
                key: change.key,
                saved: change.old,
                current: change.new,
            });
        }
        changes.push(change);
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "[model]\nd_model = 64\n\n[train]\nsteps = 40\nlog_every = 10\n";

    #[test]
    fn safe_keys_are_changes_with_old_and_new() {
        let now = SAVED
            .replace("steps = 40", "steps = 80")
            .replace("log_every = 10", "log_every = 5");
        let changes = resume_config_changes(Path::new("s"), SAVED, &now).unwrap();
        assert_eq!(
            changes,
            [
                ConfigChange {
                    key: "train.log_every".into(),
                    old: "10".into(),
                    new: "5".into()
                },
                ConfigChange {
                    key: "train.steps".into(),
                    old: "40".into(),
                    new: "80".into()
                },
            ]
        );
    }

    #[test]
    fn any_other_key_is_a_mismatch_naming_it_with_both_values() {
        let now = SAVED.replace("d_model = 64", "d_model = 32");
        let err = resume_config_changes(Path::new("s"), SAVED, &now).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("model.d_model is 64 in the checkpoint but 32 now"),
            "{msg}"
        );
        let added = format!("{SAVED}eval_batches = 2\n");
        let err = resume_config_changes(Path::new("s"), SAVED, &added).unwrap_err();
        assert!(
            err.to_string()
                .contains("train.eval_batches is <absent> in the checkpoint but 2 now"),
            "{err}"
        );
    }

    const LAYOUT: &str = "[parallel]\ndp = 2\nep = 2\nmicrobatches = 1\nfsdp = 2\n";

    #[test]
    fn a_layout_change_keeping_the_step_microbatches_is_allowed() {
        let one = "[parallel]\ndp = 1\nep = 1\nmicrobatches = 4\nfsdp = 0\n";
        let changes = resume_config_changes(Path::new("s"), LAYOUT, one).unwrap();
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "parallel.dp",
                "parallel.ep",
                "parallel.fsdp",
                "parallel.microbatches"
            ]
        );
        let ep2 = "[parallel]\nep = 2\nmicrobatches = 2\n";
        assert!(resume_config_changes(Path::new("s"), LAYOUT, ep2).is_ok());
    }

    #[test]
    fn microbatches_changing_the_step_microbatches_is_a_mismatch() {
        let err = resume_config_changes(
            Path::new("s"),
            LAYOUT,
            &LAYOUT.replace("microbatches = 1", "microbatches = 2"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("parallel.microbatches is 1 in the checkpoint but 2 now"),
            "{err}"
        );
        let one = "[parallel]\ndp = 1\nep = 1\nmicrobatches = 2\n";
        assert!(resume_config_changes(Path::new("s"), LAYOUT, one).is_err());
    }

    #[test]
    fn layout_and_line_ends_are_not_changes() {
        let now = SAVED
            .replace('\n', "  \r\n")
            .replace("d_model = 64", "d_model=64");
        assert!(resume_config_changes(Path::new("s"), SAVED, &now)
            .unwrap()
            .is_empty());
    }
}
