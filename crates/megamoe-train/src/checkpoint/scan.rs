//! Finding checkpoints on disk: the newest complete one by scanning (never by
//! trusting `latest`), what was passed over and why, listing, pruning, and retiring
//! the checkpoints a resume from an older step makes obsolete.

use std::path::{Path, PathBuf};

use super::{
    checkpoint_dir_name, verify_any, CHECKPOINTS_DIR, INDEX_FILE, MANIFEST_FILE, STATE_FILE,
};
use crate::error::{Error, Result};

/// A checkpoint directory a scan passed over, and why.
#[derive(Debug)]
pub struct Skipped {
    /// The directory.
    pub dir: PathBuf,
    /// Why it was not used: debris of an unfinished save, or the verification error.
    pub reason: String,
}

/// What [`scan_checkpoints`] found.
#[derive(Debug, Default)]
pub struct CheckpointScan {
    /// The newest checkpoint whose manifest verifies: (step, directory).
    pub newest: Option<(u64, PathBuf)>,
    /// Newer checkpoint directories that failed verification, newest first, with the
    /// error (reported; the newest one's error is the load error when none verifies).
    pub failed: Vec<(PathBuf, Error)>,
    /// Debris: `ckpt-<step>.tmp` (a save that died before its commit) and
    /// `ckpt-<step>.replaced` (a replacement that died before its cleanup).
    pub debris: Vec<PathBuf>,
}

impl CheckpointScan {
    /// Everything passed over, as `(directory, reason)` lines for the user.
    pub fn skipped(&self) -> Vec<Skipped> {
        let failed = self.failed.iter().map(|(dir, e)| Skipped {
            dir: dir.clone(),
            reason: e.to_string(),
        });
        let debris = self.debris.iter().map(|dir| Skipped {
            dir: dir.clone(),
            reason: "incomplete: left by a save that did not finish".to_string(),
        });
        failed.chain(debris).collect()
    }
}

/// A checkpoint directory found by [`resolve_checkpoint`], and what the scan skipped
/// on the way (empty when the path named the checkpoint directory itself).
#[derive(Debug)]
pub struct Resolved {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Directories passed over.
    pub skipped: Vec<Skipped>,
}

/// `(step, directory)` of each `ckpt-<step>` directory, ascending.
type StepDirs = Vec<(u64, PathBuf)>;

/// `ckpt-<step>` directories under `checkpoints_dir`, plus debris directories.
fn entries(checkpoints_dir: &Path) -> Result<(StepDirs, Vec<PathBuf>)> {
    let mut steps = Vec::new();
    let mut debris = Vec::new();
    let listing = match std::fs::read_dir(checkpoints_dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((steps, debris)),
        Err(e) => return Err(Error::io("list", checkpoints_dir, e)),
    };
    for entry in listing {
        let entry = entry.map_err(|e| Error::io("list", checkpoints_dir, e))?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ckpt-")) else {
            continue;
        };
        if !entry.path().is_dir() {
            continue;
        }
        let digits = !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit());
        if let Some(step) = rest.parse::<u64>().ok().filter(|_| digits) {
            steps.push((step, entry.path()));
        } else if rest.ends_with(".tmp") || rest.ends_with(".replaced") {
            debris.push(entry.path());
        }
    }
    steps.sort_unstable_by_key(|(s, _)| *s);
    debris.sort_unstable();
    Ok((steps, debris))
}

/// Scans `checkpoints_dir` for the newest checkpoint whose manifest and file digests
/// verify, newest first; reads nothing older than the one it picks.
pub fn scan_checkpoints(checkpoints_dir: &Path) -> Result<CheckpointScan> {
    let (steps, debris) = entries(checkpoints_dir)?;
    let mut scan = CheckpointScan {
        debris,
        ..Default::default()
    };
    for (step, dir) in steps.into_iter().rev() {
        match verify_any(&dir) {
            Ok(_) => {
                scan.newest = Some((step, dir));
                break;
            }
            Err(e) => scan.failed.push((dir, e)),
        }
    }
    Ok(scan)
}

/// The checkpoints directory `path` names: `path/checkpoints` when that exists,
/// else `path` itself.
fn checkpoints_dir_of(path: &Path) -> PathBuf {
    let sub = path.join(CHECKPOINTS_DIR);
    if sub.is_dir() {
        sub
    } else {
        path.to_path_buf()
    }
}

/// True if `path` is one checkpoint directory (holds a manifest or a state.json).
fn is_checkpoint_dir(path: &Path) -> bool {
    path.join(MANIFEST_FILE).is_file()
        || path.join(INDEX_FILE).is_file()
        || path.join(STATE_FILE).is_file()
}

/// The run directory of a `--resume` path: `<run>` for `<run>`,
/// `<run>/checkpoints` and `<run>/checkpoints/ckpt-N`. Reads nothing but names.
pub fn run_dir_of(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let up = |levels: usize| {
        path.ancestors()
            .nth(levels)
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    if name.starts_with("ckpt-") || is_checkpoint_dir(path) {
        up(2)
    } else if name == CHECKPOINTS_DIR {
        up(1)
    } else {
        path.to_path_buf()
    }
}

/// Finds the checkpoint directory `path` refers to: a checkpoint directory itself,
/// or the newest complete checkpoint (see [`scan_checkpoints`]) of a checkpoints
/// directory or a run directory. Fails with the newest candidate's verification
/// error when none verifies, and with [`Error::CheckpointMissing`] when there is none.
pub fn resolve_checkpoint(path: &Path) -> Result<Resolved> {
    if !path.exists() {
        return Err(Error::CheckpointMissing {
            path: path.to_path_buf(),
            reason: "the path does not exist".to_string(),
        });
    }
    if is_checkpoint_dir(path) {
        return Ok(Resolved {
            dir: path.to_path_buf(),
            skipped: Vec::new(),
        });
    }
    let dir = checkpoints_dir_of(path);
    let mut scan = scan_checkpoints(&dir)?;
    let skipped = scan.skipped();
    match scan.newest.take() {
        Some((_, found)) => Ok(Resolved {
            dir: found,
            skipped,
        }),
        None if !scan.failed.is_empty() => Err(scan.failed.swap_remove(0).1),
        None => Err(Error::CheckpointMissing {
            path: path.to_path_buf(),
            reason: format!(
                "no complete checkpoint (ckpt-<step>/ with {MANIFEST_FILE} or {INDEX_FILE}) in it"
            ),
        }),
    }
}

/// Step numbers of the committed checkpoints under `checkpoints_dir` (directories
/// `ckpt-<step>` holding a manifest or an index; not verified), ascending.
pub fn list_checkpoints(checkpoints_dir: &Path) -> Result<Vec<u64>> {
    let (steps, _) = entries(checkpoints_dir)?;
    Ok(steps
        .into_iter()
        .filter(|(_, dir)| super::is_checkpoint_complete(dir))
        .map(|(s, _)| s)
        .collect())
}

/// Deletes all but the newest `keep` committed checkpoints. Returns the directories
/// removed.
pub fn prune_checkpoints(checkpoints_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let steps = list_checkpoints(checkpoints_dir)?;
    let mut removed = Vec::new();
    for &step in steps.iter().rev().skip(keep.max(1)) {
        let dir = checkpoints_dir.join(checkpoint_dir_name(step));
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// Prepares `checkpoints_dir` for a run resumed at `step`: checkpoints of later
/// steps belong to a future the resumed run replaces, so each is renamed to
/// `ckpt-<step>.superseded` (kept for the user, never loaded); `.tmp` and `.replaced`
/// debris is deleted. Returns one line per directory touched. Call it only while
/// holding the run directory's lock.
pub fn retire_checkpoints_after(checkpoints_dir: &Path, step: u64) -> Result<Vec<String>> {
    let (steps, debris) = entries(checkpoints_dir)?;
    let mut done = Vec::new();
    for (s, dir) in steps.into_iter().filter(|(s, _)| *s > step) {
        let to = checkpoints_dir.join(format!("{}.superseded", checkpoint_dir_name(s)));
        if to.exists() {
            std::fs::remove_dir_all(&to).map_err(|e| Error::io("remove", &to, e))?;
        }
        std::fs::rename(&dir, &to).map_err(|e| Error::io("rename", &dir, e))?;
        done.push(format!(
            "checkpoint {} is past the resumed step {step}; renamed to {}",
            dir.display(),
            to.display()
        ));
    }
    for dir in debris {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
        done.push(format!(
            "removed {} (left by a save that did not finish)",
            dir.display()
        ));
    }
    if !done.is_empty() {
        super::sync_dir(checkpoints_dir)?;
    }
    Ok(done)
}
