//! The process-wide host-read counter: every explicit device→host read of element values
//! (`to_host_f32`, `to_host_i32`, `to_host_bf16`, `to_scalar_f32`, [`Tensor::to_host_batch_f32`])
//! adds one, so a trainer can report how many synchronisations a step cost
//! (`host_reads` in metrics.jsonl) and tests can bound them.
//!
//! On the CPU backend a "read" costs nothing but a copy; on a device backend each one is a
//! stream synchronisation. The count is of calls, not bytes: a batched read of many tensors
//! is one read.
//!
//! [`Tensor::to_host_batch_f32`]: crate::Tensor::to_host_batch_f32

use std::sync::atomic::{AtomicU64, Ordering};

static HOST_READS: AtomicU64 = AtomicU64::new(0);

/// Records one explicit device→host read. Called by the host-read API only.
pub(crate) fn record_host_read() {
    HOST_READS.fetch_add(1, Ordering::Relaxed);
}

/// Explicit device→host reads since the process started (all threads together). Take the
/// difference of two calls to count the reads of a span of work.
pub fn host_reads() -> u64 {
    HOST_READS.load(Ordering::Relaxed)
}
