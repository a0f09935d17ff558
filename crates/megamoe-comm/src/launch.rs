//! [`LaunchEnv`]: what the process launcher says about this process's place in a
//! multi-process job, read from the environment (no MPI needed, so a binary built without
//! the `mpi` feature can refuse to run as N independent copies).

use crate::error::{CommError, Result};

/// The variables read, in order of precedence: OpenMPI's, PMI's (MPICH, Slurm), the
/// generic ones (`torchrun`-style).
const SOURCES: [(&str, &str, &str); 4] = [
    (
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
    ("PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_RANK"),
    ("WORLD_SIZE", "RANK", "LOCAL_RANK"),
];

/// This process's place in a launched job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Number of processes of the job.
    pub world_size: usize,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Rank among the processes on this host (0 when the launcher does not say).
    pub local_rank: usize,
    /// The variable the size came from (e.g. `OMPI_COMM_WORLD_SIZE`).
    pub source: &'static str,
}

impl LaunchEnv {
    /// Reads the launcher's variables from the process environment; `None` when none is
    /// set (a plain start). A set but malformed value is an error naming the variable.
    pub fn detect() -> Result<Option<LaunchEnv>> {
        LaunchEnv::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`LaunchEnv::detect`] over any lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        for (size_var, rank_var, local_var) in SOURCES {
            let Some(size) = get(size_var) else { continue };
            let num = |var: &'static str, v: String| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| CommError::InvalidArgument {
                        op: "launch environment",
                        arg: var,
                        value: v,
                        rule: "must be a non-negative integer",
                    })
            };
            let world_size = num(size_var, size)?;
            if world_size == 0 {
                return Err(CommError::InvalidArgument {
                    op: "launch environment",
                    arg: size_var,
                    value: "0".into(),
                    rule: "must be at least 1",
                });
            }
            let rank = get(rank_var).map(|v| num(rank_var, v)).transpose()?;
            let rank = match rank {
                Some(r) if r < world_size => r,
                Some(r) => {
                    return Err(CommError::InvalidArgument {
                        op: "launch environment",
                        arg: rank_var,
                        value: r.to_string(),
                        rule: "must be below the world size",
                    })
                }
                None if world_size == 1 => 0,
                None => {
                    return Err(CommError::InvalidArgument {
                        op: "launch environment",
                        arg: rank_var,
                        value: "(unset)".into(),
                        rule: "must be set when the world size is above 1",
                    })
                }
            };
            let local_rank = get(local_var).map(|v| num(local_var, v)).transpose()?;
            return Ok(Some(LaunchEnv {
                world_size,
                rank,
                local_rank: local_rank.unwrap_or(0),
                source: size_var,
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn openmpi_wins_over_generic() {
        let e = env(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("RANK", "7"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.world_size, e.rank, e.local_rank), (4, 2, 1));
        assert_eq!(e.source, "OMPI_COMM_WORLD_SIZE");
    }

    #[test]
    fn generic_and_pmi_and_none() {
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")])
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.world_size, e.rank, e.local_rank, e.source),
            (2, 1, 1, "WORLD_SIZE")
        );
        let e = env(&[("PMI_SIZE", "3"), ("PMI_RANK", "0")])
            .unwrap()
            .unwrap();
        assert_eq!((e.world_size, e.rank, e.local_rank), (3, 0, 0));
        assert_eq!(env(&[]).unwrap(), None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = env(&[("WORLD_SIZE", "two")]).unwrap_err().to_string();
        assert!(err.contains("WORLD_SIZE=two"), "{err}");
        let err = env(&[("WORLD_SIZE", "2"), ("RANK", "2")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RANK=2") && err.contains("below the world size"),
            "{err}"
        );
        let err = env(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(err.contains("RANK=(unset)"), "{err}");
    }
}
