//! What a resume may change in the run config: the keys of
//! [`RESUME_SAFE_KEYS`] (run length and cadences), nothing else. Configs are
//! compared key by key (`section.key`), so the error names the first key that
//! differs with both values.

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
/// checkpoint `state_path`), all in [`RESUME_SAFE_KEYS`]; or
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
        if !RESUME_SAFE_KEYS.contains(&key.as_str()) {
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
