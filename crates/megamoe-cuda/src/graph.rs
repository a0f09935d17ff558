//! CUDA graph capture and replay of the engine's stream (static shapes only: every buffer
//! a captured region touches must stay allocated while the graph lives).
//!
//! Allocations made from the pool while capturing become graph memory nodes: their
//! addresses are fixed for the graph's life, and the graph is instantiated with
//! auto-free-on-launch, so a buffer the captured region allocated and the caller still
//! holds is freed and allocated again (same address, rewritten by the replay) at every
//! replay. Uploads inside a captured region go through [`Gpu::upload_staged`]: the copy
//! reads a pinned host buffer that must live as long as the graph.
//!
//! Memory: the pool's counters see the captured allocations as they are made (its peak
//! over the capture), and each replay raises the peak to the memory live at its launch
//! plus that rise ([`Graph::peak_extra`]), so the step metrics' pool peak of a replayed
//! step counts its graph memory.

use cudarc::driver::{result as dres, sys as dsys};

use crate::device::Gpu;
use crate::error::{DriverCtx, Result};
use crate::pool::DeviceMem;

/// An instantiated graph, replayed on the engine's stream.
pub struct Graph {
    graph: dsys::CUgraph,
    exec: dsys::CUgraphExec,
    /// How far the captured work's allocations rose above the memory live at capture.
    peak_extra: u64,
}

// SAFETY: the handles are plain driver objects; every use goes through a `Gpu` (whose
// context is made current first), and the driver allows using them from any thread.
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

/// Page-locked host memory holding one upload's bytes for a captured copy.
pub struct PinnedHost {
    ptr: *mut std::ffi::c_void,
}

// SAFETY: the buffer is written once before the copy is captured and only read by the
// device afterwards; freeing it is thread-safe.
unsafe impl Send for PinnedHost {}
unsafe impl Sync for PinnedHost {}

impl std::fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedHost")
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::free_host(self.ptr);
        }
    }
}

impl Gpu {
    /// Runs `body` under stream capture and instantiates what it queued. `body` must only
    /// queue work (no host reads, no synchronisation).
    pub fn capture(&self, body: impl FnOnce(&Gpu) -> Result<()>) -> Result<Graph> {
        self.begin_capture()?;
        let queued = body(self);
        let graph = self.end_capture();
        queued?;
        graph
    }

    /// Waits for the stream, then starts capturing it: until [`Gpu::end_capture`], work
    /// queued on the stream is recorded, not run. Relaxed mode: the pinned staging of
    /// [`Gpu::upload_staged`] may allocate host memory while capturing.
    pub fn begin_capture(&self) -> Result<()> {
        self.synchronize()?;
        // Graph memory nodes take their memory outside the pool: give the pool's free
        // reserve back first so a step near the card's size still fits.
        unsafe { dres::mem_pool::trim_to(self.pool.pool, 0) }.ctx("cuMemPoolTrimTo")?;
        unsafe {
            dres::stream::begin_capture(
                self.stream(),
                dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .ctx("cuStreamBeginCapture")?;
        self.pool.begin_capture_window();
        Ok(())
    }

    /// Ends the capture begun by [`Gpu::begin_capture`] and instantiates the recorded
    /// work (auto-free on launch: see the module doc).
    pub fn end_capture(&self) -> Result<Graph> {
        let peak_extra = self.pool.end_capture_window();
        let graph =
            unsafe { dres::stream::end_capture(self.stream()) }.ctx("cuStreamEndCapture")?;
        let exec = unsafe {
            dres::graph::instantiate(
                graph,
                dsys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
        };
        match exec.ctx("cuGraphInstantiate") {
            Ok(exec) => Ok(Graph {
                graph,
                exec,
                peak_extra,
            }),
            Err(e) => {
                unsafe {
                    let _ = dres::graph::destroy(graph);
                }
                Err(e)
            }
        }
    }

    /// Queues one replay of `graph`; the pool's peak counts its graph memory
    /// ([`crate::PoolStats::peak`]).
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        unsafe { dres::graph::launch(graph.exec, self.stream()) }.ctx("cuGraphLaunch")?;
        self.pool.replay_window(graph.peak_extra);
        Ok(())
    }

    /// Queues a copy of `src` into `dst` that may be captured: `src` is first copied into
    /// fresh page-locked memory, which the copy reads when it runs (at every replay of a
    /// captured copy), so the returned buffer must outlive the work (or the graph). Does
    /// not synchronise.
    pub fn upload_staged<T: Copy>(&self, dst: &impl DeviceMem, src: &[T]) -> Result<PinnedHost> {
        let bytes = std::mem::size_of_val(src);
        if bytes > dst.bytes() {
            return Err(crate::Error::Length {
                what: "upload_staged",
                host: bytes,
                device: dst.bytes(),
            });
        }
        let ptr = unsafe { dres::malloc_host(bytes.max(1), 0) }.ctx("cuMemHostAlloc")?;
        let pinned = PinnedHost { ptr };
        // SAFETY: `ptr` is a fresh allocation of at least `bytes` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, ptr as *mut u8, bytes);
            let host = std::slice::from_raw_parts(ptr as *const u8, bytes);
            dres::memcpy_htod_async(dst.ptr(), host, self.stream())
        }
        .ctx("cuMemcpyHtoDAsync")?;
        Ok(pinned)
    }
}

impl Graph {
    /// How far the captured work's allocations (its graph memory) rose above the memory
    /// live when it was captured, in bytes: what a replay needs on top of the memory
    /// live at its launch.
    pub fn peak_extra(&self) -> u64 {
        self.peak_extra
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::graph::exec_destroy(self.exec);
            let _ = dres::graph::destroy(self.graph);
        }
    }
}
