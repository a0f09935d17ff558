//! The process-wide live tensor bytes counter: bytes held by tensor buffers that exist right
//! now, and the peak since the last [`reset_peak_bytes`]. A trainer resets the peak at the
//! start of a step and reports [`peak_bytes`] as the step's measured memory.
//!
//! Counts element bytes of every backend buffer (views share their buffer and add nothing);
//! allocator overhead, the gemm crate's packing buffers and host-side copies returned by
//! the host-read API are not tensors and are not counted.

use std::sync::atomic::{AtomicU64, Ordering};

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// Adds a new buffer of `bytes` to the live count and raises the peak if needed.
pub(crate) fn on_alloc(bytes: usize) {
    let now = LIVE.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// Removes a dropped buffer of `bytes` from the live count.
pub(crate) fn on_free(bytes: usize) {
    LIVE.fetch_sub(bytes as u64, Ordering::Relaxed);
}

/// Bytes of all tensor buffers alive now (all threads together).
pub fn live_bytes() -> u64 {
    LIVE.load(Ordering::Relaxed)
}

/// The highest [`live_bytes`] seen since the process started or the last
/// [`reset_peak_bytes`].
pub fn peak_bytes() -> u64 {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak window at the current live bytes (e.g. at the start of a step).
pub fn reset_peak_bytes() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}
