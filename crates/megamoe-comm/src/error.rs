//! [`CommError`]: every way a collective can fail, each naming the rank that saw it, the
//! operation and (for failures of others) the rank that caused it.

use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// A failed collective or communicator call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    // ---------------------------------------------------------------- failures of other ranks
    /// Another rank failed (returned an error, panicked, or was killed); this rank stopped
    /// waiting for it.
    #[error("rank {rank}: {op} aborted: rank {failed_rank} failed: {reason}")]
    PeerFailed {
        /// The rank reporting (world rank).
        rank: usize,
        /// The operation that was waiting.
        op: &'static str,
        /// The rank that failed first (world rank).
        failed_rank: usize,
        /// What that rank reported.
        reason: String,
    },
    /// The operation waited longer than the communicator's timeout.
    #[error(
        "rank {rank}: {op} timed out after {waited:?} waiting for rank(s) {missing:?} \
         (they never joined it; hung or dead)"
    )]
    Timeout {
        /// The rank reporting (world rank).
        rank: usize,
        /// The operation that timed out.
        op: &'static str,
        /// How long it waited.
        waited: Duration,
        /// World ranks that had not joined the operation.
        missing: Vec<usize>,
    },

    // ---------------------------------------------------------------- mismatched calls
    /// The ranks of a group called different collectives, or the same one with arguments
    /// that do not fit together (shapes, counts, roots, reduce ops).
    #[error("rank {rank}: {op}: {detail}")]
    Mismatch {
        /// The rank reporting (world rank).
        rank: usize,
        /// The operation.
        op: &'static str,
        /// What differs between the ranks, with the values.
        detail: String,
    },
    /// A bad argument to a communicator call.
    #[error("{op}: {arg}={value} {rule}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Its value.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },

    // ---------------------------------------------------------------- engines
    /// A tensor op inside a collective failed.
    #[error(transparent)]
    Tensor(#[from] megamoe_tensor::Error),
    /// The MPI engine reported an error.
    #[error("rank {rank}: MPI: {detail}")]
    Mpi {
        /// The rank reporting.
        rank: usize,
        /// What MPI said or what was wrong.
        detail: String,
    },
}

impl CommError {
    /// The world rank that failed first when this error is a consequence of another rank's
    /// failure (or timeout), so launchers can name it.
    pub fn failed_rank(&self) -> Option<usize> {
        match self {
            CommError::PeerFailed { failed_rank, .. } => Some(*failed_rank),
            CommError::Timeout { missing, .. } => missing.first().copied(),
            _ => None,
        }
    }
}
