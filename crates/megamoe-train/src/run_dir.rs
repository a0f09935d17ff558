//! The layout of a run directory, in one place.
//!
//! ```text
//! <run_dir>/
//!   lock                 advisory lock held by the process writing the run; holds its pid
//!   config.toml          the resolved config the run was started with
//!   run.json             where the run reads its data (for a resume before the
//!                        first checkpoint)
//!   metrics.jsonl        one JSON record per line (see `metrics`)
//!   checkpoints/         see `checkpoint` (latest, ckpt-<step>/...)
//!   report/              written by `megamoe report` (see `report`)
//! ```

use std::path::{Path, PathBuf};

use crate::checkpoint::CHECKPOINTS_DIR;
use crate::error::{Error, Result};
use crate::metrics::METRICS_FILE;
use crate::report::REPORT_DIR;

/// File name of the config copy inside a run directory.
pub const CONFIG_FILE: &str = "config.toml";
/// File name of the lock file inside a run directory.
pub const LOCK_FILE: &str = "lock";
/// File name of the run's origin record (data source) inside a run directory.
pub const ORIGIN_FILE: &str = "run.json";

/// An exclusive advisory lock on a run directory, held until dropped (or the
/// process ends, however it ends: the OS releases it). Two processes never write
/// one run directory at the same time.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    /// Creates `run_dir` if needed and takes its lock, writing this process's pid
    /// into `<run_dir>/lock`. Fails with [`Error::RunDirLocked`] naming the holder's
    /// pid if another process holds it; never waits.
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io("create", run_dir, e))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "pid not yet recorded".to_string(),
                };
                return Err(Error::RunDirLocked {
                    path: run_dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
        }
        file.set_len(0)
            .and_then(|()| file.seek(std::io::SeekFrom::Start(0)).map(drop))
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush())
            .map_err(|e| Error::io("write", &path, e))?;
        Ok(RunLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A run directory and the paths inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Uses `path` as the run directory, creating it (and `checkpoints/`) if needed.
    pub fn create(path: &Path) -> Result<Self> {
        let run = RunDir {
            root: path.to_path_buf(),
        };
        let ckpts = run.checkpoints_dir();
        std::fs::create_dir_all(&ckpts).map_err(|e| Error::io("create", &ckpts, e))?;
        Ok(run)
    }

    /// A fresh directory `<base>/run-<UTC yyyymmdd-hhmmss>` (with `-2`, `-3`, ...
    /// appended if that name is taken), created.
    pub fn create_unique(base: &Path) -> Result<Self> {
        let stamp = crate::clock::UtcTime::now().compact();
        Self::create_named(base, &format!("run-{stamp}"))
    }

    /// A fresh directory `<base>/<name>` (with `-2`, `-3`, ... appended if that
    /// name is taken), created.
    pub fn create_named(base: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(base).map_err(|e| Error::io("create", base, e))?;
        for n in 1u32.. {
            let path = match n {
                1 => base.join(name),
                _ => base.join(format!("{name}-{n}")),
            };
            // create_dir (not _all) fails if it exists, so two processes never share one.
            match std::fs::create_dir(&path) {
                Ok(()) => return Self::create(&path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create", &path, e)),
            }
        }
        unreachable!("u32 suffixes run out only after 4 billion runs of one name")
    }

    /// Opens an existing run directory (for `--resume` and `report`).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::CheckpointMissing {
                path: path.to_path_buf(),
                reason: "the run directory does not exist".to_string(),
            });
        }
        Ok(RunDir {
            root: path.to_path_buf(),
        })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<run_dir>/config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// `<run_dir>/metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// `<run_dir>/checkpoints`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join(CHECKPOINTS_DIR)
    }

    /// `<run_dir>/report`.
    pub fn report_dir(&self) -> PathBuf {
        self.root.join(REPORT_DIR)
    }

    /// Writes the resolved config text to `config.toml` (replacing an older copy
    /// atomically).
    pub fn write_config(&self, toml_text: &str) -> Result<()> {
        crate::checkpoint::write_file_atomic(&self.config_path(), toml_text.as_bytes(), 0)
    }

    /// Records where the run reads its data (`run.json`), so a run killed before its
    /// first checkpoint can be resumed with the same data.
    pub fn write_origin(&self, data_source: &str) -> Result<()> {
        let path = self.root.join(ORIGIN_FILE);
        let text = serde_json::json!({ "data": data_source }).to_string();
        crate::checkpoint::write_file_atomic(&path, text.as_bytes(), 0)
    }

    /// The data source recorded by [`RunDir::write_origin`], if any.
    pub fn read_origin(&self) -> Result<Option<String>> {
        let path = self.root.join(ORIGIN_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::CheckpointMalformed {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(v["data"].as_str().map(str::to_string))
    }

    /// Reads `config.toml`.
    pub fn read_config(&self) -> Result<String> {
        let path = self.config_path();
        std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn create_makes_layout_and_paths_are_inside() {
        let dir = TestDir::new("run_dir_layout");
        let run = RunDir::create(&dir.path().join("r1")).unwrap();
        assert!(run.checkpoints_dir().is_dir());
        assert_eq!(
            run.metrics_path(),
            dir.path().join("r1").join("metrics.jsonl")
        );
        run.write_config("[model]\nhidden = 8\n").unwrap();
        assert_eq!(run.read_config().unwrap(), "[model]\nhidden = 8\n");
        assert_eq!(RunDir::open(run.path()).unwrap(), run);
    }

    #[test]
    fn create_unique_never_reuses_a_directory() {
        let dir = TestDir::new("run_dir_unique");
        let a = RunDir::create_unique(dir.path()).unwrap();
        let b = RunDir::create_unique(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(dir.path()) && b.path().is_dir());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("run-20") && name.len() == "run-yyyymmdd-hhmmss".len(),
            "{name}"
        );
    }

    #[test]
    fn create_named_appends_a_counter_when_the_name_is_taken() {
        let dir = TestDir::new("run_dir_named");
        let a = RunDir::create_named(dir.path(), "exp").unwrap();
        let b = RunDir::create_named(dir.path(), "exp").unwrap();
        assert_eq!(a.path(), dir.path().join("exp"));
        assert_eq!(b.path(), dir.path().join("exp-2"));
    }

    #[test]
    fn open_missing_dir_is_named_error() {
        let dir = TestDir::new("run_dir_missing");
        let err = RunDir::open(&dir.path().join("gone")).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }
}
