//! The [`Communicator`] trait: the collectives every distributed piece of megamoe is written
//! against, on [`Tensor`]s, so thread ranks, MPI and NCCL (on CUDA streams) implement the
//! same calls.
//!
//! Every collective has a `start_*` form returning a [`Pending`] handle (the engine may run it
//! while the caller computes; NCCL enqueues it on a stream) and a blocking form (`start_*` then
//! [`Pending::wait`]). Rules shared by all engines:
//! - The ranks of a communicator issue its collectives in the same order (as in MPI and NCCL).
//! - Reductions are deterministic: contributions are combined in rank order,
//!   `((x0 + x1) + x2) + …`, so every rank gets identical bits and the result does not depend
//!   on timing (see [`reduce_in_rank_order`](crate::reduce_in_rank_order)).
//! - Rows are dim 0. `all_gather` concatenates along dim 0 in rank order; `reduce_scatter`
//!   splits dim 0 into `size` equal blocks and rank `r` keeps block `r`.
//! - A failed or vanished rank turns into an error on every other rank
//!   ([`CommError::PeerFailed`] naming it, or [`CommError::Timeout`] naming the ranks that
//!   never joined), never into a hang.

use megamoe_tensor::{DType, Tensor};

use crate::error::{CommError, Result};

/// How a reduction combines the ranks' contributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Elementwise sum (in rank order).
    Sum,
    /// Elementwise sum (in rank order) times `1 / size`.
    Mean,
    /// Elementwise maximum.
    Max,
}

impl ReduceOp {
    /// Lower-case name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }
}

type Deferred = Box<dyn FnOnce() -> Result<Tensor> + Send>;

/// An operation in flight. [`Pending::wait`] blocks until it is done and returns its tensor.
/// Dropping a handle without waiting abandons the result (the other ranks are not affected).
#[must_use = "a collective's result arrives only through wait()"]
pub struct Pending {
    inner: PendingInner,
}

enum PendingInner {
    Ready(Tensor),
    Deferred(Deferred),
}

impl Pending {
    /// A handle whose result is already there.
    pub fn ready(result: Tensor) -> Pending {
        Pending {
            inner: PendingInner::Ready(result),
        }
    }

    /// A handle that completes by running `finish` (which may block) on `wait`.
    pub fn deferred(finish: impl FnOnce() -> Result<Tensor> + Send + 'static) -> Pending {
        Pending {
            inner: PendingInner::Deferred(Box::new(finish)),
        }
    }

    /// Blocks until the operation is done; its result, or the error every rank sees.
    pub fn wait(self) -> Result<Tensor> {
        match self.inner {
            PendingInner::Ready(t) => Ok(t),
            PendingInner::Deferred(f) => f(),
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.inner {
            PendingInner::Ready(_) => f.write_str("Pending(ready)"),
            PendingInner::Deferred(_) => f.write_str("Pending(in flight)"),
        }
    }
}

/// A group of ranks and the collectives among them.
///
/// Ranks are numbered `0..size()` inside the communicator; [`Communicator::members`] maps them
/// to world ranks (used in error messages and by [`Communicator::split`]).
pub trait Communicator: Send + Sync {
    /// This rank's index in the communicator.
    fn rank(&self) -> usize;

    /// Number of ranks in the communicator.
    fn size(&self) -> usize;

    /// World ranks of the members, indexed by communicator rank.
    fn members(&self) -> &[usize];

    /// This rank's world rank.
    fn world_rank(&self) -> usize {
        self.members()[self.rank()]
    }

    /// Starts an all-reduce: every rank passes a tensor of the same shape and float dtype and
    /// gets the reduction of all of them (same dtype; sums in f32, in rank order).
    fn start_all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Pending>;

    /// Starts an all-gather: every rank passes `[n, ...]` (same shape and dtype everywhere) and
    /// gets `[size·n, ...]`, rank `r`'s rows at `[r·n, (r+1)·n)`.
    fn start_all_gather(&self, x: &Tensor) -> Result<Pending>;

    /// Starts a reduce-scatter: every rank passes `[size·c, ...]` (float, same shape) and gets
    /// `[c, ...]`, rows `[rank·c, (rank+1)·c)` of the reduction. Pad dim 0 to a multiple of
    /// `size` first (the FSDP `chunk` rule's padded shard).
    fn start_reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Pending>;

    /// Starts an all-to-all with per-peer row counts: `x` is `[Σ send_rows, ...]`, its first
    /// `send_rows[0]` rows go to rank 0, the next `send_rows[1]` to rank 1, …; the result is
    /// `[Σ recv_rows, ...]`, the rows from rank 0 first. `recv_rows[j]` must equal what rank
    /// `j` sends here (exchange counts first with [`Communicator::exchange_counts`], or use
    /// fixed splits in static-capacity mode).
    fn start_all_to_all_v(
        &self,
        x: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Pending>;

    /// Starts a broadcast: every rank passes a tensor of the same shape and dtype (its values
    /// are ignored except on `root`) and gets `root`'s tensor.
    fn start_broadcast(&self, x: &Tensor, root: usize) -> Result<Pending>;

    /// Sends `x` to rank `dst` with `tag`. Messages between one (source, destination, tag)
    /// arrive in the order they were sent. Returns once `x` may be reused.
    fn send(&self, x: &Tensor, dst: usize, tag: u32) -> Result<()>;

    /// Starts receiving the next message from `src` with `tag`, of the given shape and dtype
    /// (the receiver sizes its buffer, as NCCL needs); a different shape or dtype is an error.
    fn start_recv(&self, src: usize, tag: u32, shape: &[usize], dtype: DType) -> Result<Pending>;

    /// Blocks until every rank of the communicator has reached the barrier.
    fn barrier(&self) -> Result<()>;

    /// Builds a sub-communicator. Collective over this communicator: every rank passes the
    /// ranks (of this communicator) of the group it joins, in the order that becomes the new
    /// communicator's rank order; it must contain the caller, and every member of a group must
    /// pass the same list. Build groups once and keep them.
    fn split(&self, group: &[usize]) -> Result<Box<dyn Communicator>>;

    // ------------------------------------------------------------ blocking forms

    /// [`Communicator::start_all_reduce`], then wait.
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.start_all_reduce(x, op)?.wait()
    }

    /// [`Communicator::start_all_gather`], then wait.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.start_all_gather(x)?.wait()
    }

    /// [`Communicator::start_reduce_scatter`], then wait.
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.start_reduce_scatter(x, op)?.wait()
    }

    /// [`Communicator::start_all_to_all_v`], then wait.
    fn all_to_all_v(&self, x: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> Result<Tensor> {
        self.start_all_to_all_v(x, send_rows, recv_rows)?.wait()
    }

    /// [`Communicator::start_broadcast`], then wait.
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.start_broadcast(x, root)?.wait()
    }

    /// [`Communicator::start_recv`], then wait.
    fn recv(&self, src: usize, tag: u32, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.start_recv(src, tag, shape, dtype)?.wait()
    }

    /// The counts exchange before an [`all_to_all_v`](Communicator::all_to_all_v): given how
    /// many rows this rank sends to each rank, returns how many it receives from each.
    ///
    /// SYNC: reads the received counts on the host (they size the receive buffer). Static-
    /// capacity dispatch uses fixed splits and skips this call.
    fn exchange_counts(&self, send_rows: &[usize]) -> Result<Vec<usize>> {
        const OP: &str = "exchange_counts";
        check_counts(OP, "send_rows", send_rows, self.size())?;
        let counts = send_rows
            .iter()
            .map(|&c| {
                i32::try_from(c).map_err(|_| CommError::InvalidArgument {
                    op: OP,
                    arg: "send_rows",
                    value: c.to_string(),
                    rule: "each count must fit in i32",
                })
            })
            .collect::<Result<Vec<i32>>>()?;
        let n = self.size();
        let x = Tensor::from_vec_i32(counts, [n], megamoe_tensor::Device::Cpu)?;
        let ones = vec![1; n];
        let got = self.all_to_all_v(&x, &ones, &ones)?.to_host_i32()?;
        Ok(got.into_iter().map(|c| c.max(0) as usize).collect())
    }
}

/// Checks a per-peer count list has one entry per rank.
pub(crate) fn check_counts(
    op: &'static str,
    arg: &'static str,
    counts: &[usize],
    size: usize,
) -> Result<()> {
    if counts.len() != size {
        return Err(CommError::InvalidArgument {
            op,
            arg,
            value: format!("{counts:?}"),
            rule: "needs one count per rank of the communicator",
        });
    }
    Ok(())
}

/// Checks a peer rank is inside the communicator.
pub(crate) fn check_peer(
    op: &'static str,
    arg: &'static str,
    peer: usize,
    size: usize,
) -> Result<()> {
    if peer >= size {
        return Err(CommError::InvalidArgument {
            op,
            arg,
            value: peer.to_string(),
            rule: "must be a rank of the communicator (< size)",
        });
    }
    Ok(())
}
