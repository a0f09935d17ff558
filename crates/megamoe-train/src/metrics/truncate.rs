//! Cutting `metrics.jsonl` back to a resumed step, so each step has one record.

use std::path::Path;

use crate::error::{Error, Result};

/// True if the JSONL `line` belongs to a run resumed at `step`: records of steps
/// `≤ step`, `run` records of segments that started before `step`, and any other
/// line without a step. Lines that do not parse (a write cut by a crash) are dropped.
fn keep(line: &str, step: u64) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    if let Some(start) = v.get("start_step").and_then(serde_json::Value::as_u64) {
        return start < step;
    }
    // A resume at `step` records its config changes again.
    if v.get("kind").and_then(serde_json::Value::as_str) == Some("config_change") {
        return v
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|s| s < step);
    }
    v.get("step")
        .and_then(serde_json::Value::as_u64)
        .is_none_or(|s| s <= step)
}

/// Rewrites the metrics file `path` (if it exists) without the records a run resumed
/// at `step` will write again (see [`keep`]); atomically (temp file, fsync, rename).
/// Returns how many lines were dropped.
pub fn truncate_after_step(path: &Path, step: u64) -> Result<usize> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.split_inclusive('\n') {
        let complete = line.ends_with('\n');
        let body = line.trim();
        if body.is_empty() {
            continue;
        }
        if complete && keep(body, step) {
            kept.push_str(body);
            kept.push('\n');
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        crate::checkpoint::write_file_atomic(path, kept.as_bytes(), step)?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn keeps_records_up_to_the_step_and_segments_started_before_it() {
        let dir = TestDir::new("metrics_truncate");
        let path = dir.path().join("metrics.jsonl");
        let lines = [
            r#"{"kind":"run","start_step":0}"#,
            r#"{"kind":"step","step":1}"#,
            r#"{"kind":"step","step":2}"#,
            r#"{"kind":"eval","step":2}"#,
            r#"{"kind":"goodput","step":2}"#,
            r#"{"kind":"run","start_step":2}"#,
            r#"{"kind":"step","step":3}"#,
            r#"{"kind":"sample","step":3}"#,
        ];
        let mut text = lines.join("\n");
        text.push_str("\n{\"kind\":\"step\",\"st"); // a write cut by a crash
        std::fs::write(&path, &text).unwrap();
        assert_eq!(truncate_after_step(&path, 2).unwrap(), 4);
        let want: String = lines[..5].iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), want);
        // Nothing to drop: the file is not rewritten.
        assert_eq!(truncate_after_step(&path, 2).unwrap(), 0);
        // Resuming at step 0 drops everything, the run record of step 0 included.
        assert_eq!(truncate_after_step(&path, 0).unwrap(), 5);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert_eq!(truncate_after_step(&dir.path().join("none"), 3).unwrap(), 0);
    }
}
