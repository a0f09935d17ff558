//! Activation offload: device buffers moved to pinned host memory and back on a copy
//! stream of their own, ordered against the engine's stream with events only (no host
//! synchronisation, so a step that offloads can be queued ahead and captured).
//!
//! [`CopyStream::park`]: the copy stream waits for the engine's work queued so far (the
//! forward that wrote the buffer), copies device → host, and frees the device buffer on
//! the copy stream (stream-ordered: the pool reuses it once the copy is done), so the
//! engine's stream never waits for a park. [`CopyStream::fetch`]: a fresh buffer is
//! allocated on the engine's stream, the copy stream waits for that point, copies host →
//! device, and the engine's stream waits for the copy before anything queued later. The
//! copies move the bytes unchanged: a fetched buffer is bit-identical to the parked one.
//!
//! Pinned blocks are kept on a free list by size and reused (same addresses step after
//! step): every copy into or out of a block is queued on the one copy stream, so a block
//! reused after its fetch is written only after that fetch's copy has read it.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as dres, sys as dsys};

use crate::error::{DriverCtx, Error, Result};
use crate::pool::{DeviceBuffer, PoolState};
use crate::Gpu;

/// A pinned (page-locked) host allocation.
struct HostBlock {
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: the block is only read and written by copies queued on the copy stream; freeing
// pinned memory is thread-safe.
unsafe impl Send for HostBlock {}

impl Drop for HostBlock {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::free_host(self.ptr);
        }
    }
}

/// One event (timing off), destroyed on drop (the driver keeps it until it completes).
struct Event(dsys::CUevent);

// SAFETY: an event handle is valid from any thread of the context.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    fn new() -> Result<Event> {
        Ok(Event(
            dres::event::create(dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .ctx("cuEventCreate")?,
        ))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::event::destroy(self.0);
        }
    }
}

struct Inner {
    stream: dsys::CUstream,
    pool: Arc<PoolState>,
    free: Mutex<Vec<HostBlock>>,
}

// SAFETY: driver handles valid from any thread once the context is current (`bind`); the
// free list is behind a mutex.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::ctx::set_current(self.pool.ctx);
            let _ = dres::stream::synchronize(self.stream);
            let _ = dres::stream::destroy(self.stream);
        }
    }
}

impl Inner {
    /// `a` waits (on the device) for the work queued on `b` so far.
    fn order_after(&self, a: dsys::CUstream, b: dsys::CUstream) -> Result<()> {
        let e = Event::new()?;
        unsafe {
            dres::event::record(e.0, b).ctx("cuEventRecord")?;
            dres::stream::wait_event(a, e.0, dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .ctx("cuStreamWaitEvent")
        }
    }

    /// A pinned block of exactly `bytes` (a free one, else a new allocation).
    fn block(&self, bytes: usize) -> Result<HostBlock> {
        let mut free = self.free.lock().map_err(|_| {
            Error::invalid("offload free list", "poisoned", "a lock holder panicked")
        })?;
        if let Some(i) = free.iter().rposition(|b| b.bytes == bytes) {
            return Ok(free.swap_remove(i));
        }
        drop(free);
        let ptr = unsafe { dres::malloc_host(bytes.max(1), 0) }.ctx("cuMemHostAlloc")?;
        Ok(HostBlock { ptr, bytes })
    }
}

/// The engine's copy stream for activation offload (see the module doc).
#[derive(Clone)]
pub struct CopyStream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CopyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopyStream")
    }
}

/// A device buffer's bytes in pinned host memory (see [`CopyStream::park`]); its block
/// goes back to the free list on drop.
pub struct Parked {
    block: Option<HostBlock>,
    bytes: usize,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Parked({} B)", self.bytes)
    }
}

impl Parked {
    /// Bytes held on the host.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let (Some(b), Ok(mut free)) = (self.block.take(), self.inner.free.lock()) {
            free.push(b);
        }
    }
}

impl Gpu {
    /// A copy stream for activation offload on this GPU (non-blocking, capturable).
    pub fn copy_stream(&self) -> Result<CopyStream> {
        self.bind()?;
        let stream =
            dres::stream::create(dres::stream::StreamKind::NonBlocking).ctx("cuStreamCreate")?;
        Ok(CopyStream {
            inner: Arc::new(Inner {
                stream,
                pool: self.pool.clone(),
                free: Mutex::new(Vec::new()),
            }),
        })
    }
}

impl CopyStream {
    /// Moves `buf` to pinned host memory: after the engine's work queued so far, copied on
    /// the copy stream and freed there. The engine's stream does not wait.
    pub fn park(&self, buf: DeviceBuffer) -> Result<Parked> {
        let i = &self.inner;
        i.pool.bind()?;
        let bytes = buf.bytes();
        let block = i.block(bytes)?;
        i.order_after(i.stream, i.pool.stream)?;
        unsafe {
            dsys::cuMemcpyDtoHAsync_v2(block.ptr, buf.ptr(), bytes, i.stream)
                .result()
                .ctx("cuMemcpyDtoHAsync (offload)")?;
        }
        buf.free_on(i.stream);
        Ok(Parked {
            block: Some(block),
            bytes,
            inner: i.clone(),
        })
    }

    /// A fresh device buffer to hold `p`'s bytes: allocated on the engine's stream and
    /// copied on the copy stream. Call [`Fetched::ready`] before the engine's stream uses
    /// it (so a fetch queued ahead overlaps the work queued in between).
    pub fn fetch(&self, p: &Parked) -> Result<Fetched> {
        let i = &self.inner;
        i.pool.bind()?;
        let block = p
            .block
            .as_ref()
            .ok_or_else(|| Error::invalid("parked block", "none", "was returned already"))?;
        let buf = DeviceBuffer::alloc(&i.pool, p.bytes)?;
        i.order_after(i.stream, i.pool.stream)?;
        unsafe {
            dsys::cuMemcpyHtoDAsync_v2(buf.ptr(), block.ptr, p.bytes, i.stream)
                .result()
                .ctx("cuMemcpyHtoDAsync (offload)")?;
        }
        let done = Event::new()?;
        unsafe { dres::event::record(done.0, i.stream) }.ctx("cuEventRecord")?;
        Ok(Fetched {
            buf,
            done,
            engine: i.pool.stream,
        })
    }
}

/// A fetch in flight (see [`CopyStream::fetch`]).
pub struct Fetched {
    buf: DeviceBuffer,
    done: Event,
    engine: dsys::CUstream,
}

// SAFETY: driver handles valid from any thread of the context.
unsafe impl Send for Fetched {}
unsafe impl Sync for Fetched {}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fetched({:?})", self.buf)
    }
}

impl Fetched {
    /// The buffer, with the engine's stream told to wait for its copy first.
    pub fn ready(self) -> Result<DeviceBuffer> {
        unsafe {
            dres::stream::wait_event(
                self.engine,
                self.done.0,
                dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .ctx("cuStreamWaitEvent")?;
        Ok(self.buf)
    }
}
