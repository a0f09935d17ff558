//! Stream-ordered device memory: every buffer comes from the device's memory pool through
//! `cuMemAllocFromPoolAsync` on the engine's stream and goes back with `cuMemFreeAsync` on
//! drop. The pool keeps freed memory reserved (release threshold = max), like a caching
//! allocator; [`PoolStats`] reports what is reserved, used now and used at peak.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys;

use crate::error::{DriverCtx, Error, Result};

/// Memory counters of one engine, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Held by the pool (used + cached free blocks), as the driver reports it.
    pub reserved: u64,
    /// Live buffers now.
    pub used: u64,
    /// Highest `used` since the engine started or [`crate::Gpu::reset_peak`]; a graph
    /// replay counts as `used` at its launch plus the rise of the captured work's
    /// allocations over what was live when it was captured (its graph memory).
    pub peak: u64,
}

/// The pool and the stream its allocations are ordered on (shared by every buffer).
pub(crate) struct PoolState {
    pub(crate) ctx: sys::CUcontext,
    pub(crate) pool: sys::CUmemoryPool,
    pub(crate) stream: sys::CUstream,
    used: AtomicU64,
    peak: AtomicU64,
    /// While capturing: `used` when the capture began and the peak before it.
    capture_base: AtomicU64,
    capture_saved_peak: AtomicU64,
}

// SAFETY: the context, pool and stream are driver handles, valid from any host thread (the
// driver API is thread-safe); the counters are atomics. Work is ordered by the stream, not
// by the host thread that queues it, and `bind` makes the context current before any call.
unsafe impl Send for PoolState {}
unsafe impl Sync for PoolState {}

impl PoolState {
    /// The device's default pool, told to keep what is freed.
    pub(crate) fn new(
        ctx: sys::CUcontext,
        dev: sys::CUdevice,
        stream: sys::CUstream,
    ) -> Result<PoolState> {
        let pool = unsafe { result::device::get_default_mem_pool(dev) }
            .ctx("cuDeviceGetDefaultMemPool")?;
        let mut threshold = u64::MAX;
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
        }
        .ctx("cuMemPoolSetAttribute(release threshold)")?;
        Ok(PoolState {
            ctx,
            pool,
            stream,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            capture_base: AtomicU64::new(0),
            capture_saved_peak: AtomicU64::new(0),
        })
    }

    pub(crate) fn stats(&self) -> Result<PoolStats> {
        let mut reserved = 0u64;
        unsafe {
            result::mem_pool::get_attribute(
                self.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                &mut reserved as *mut u64 as *mut c_void,
            )
        }
        .ctx("cuMemPoolGetAttribute(reserved)")?;
        Ok(PoolStats {
            reserved,
            used: self.used.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
        })
    }

    pub(crate) fn reset_peak(&self) {
        self.peak
            .store(self.used.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// A capture begins: its allocations (graph memory, counted here as they are made)
    /// get a peak window of their own.
    pub(crate) fn begin_capture_window(&self) {
        let used = self.used.load(Ordering::Relaxed);
        self.capture_base.store(used, Ordering::Relaxed);
        let before = self.peak.swap(used, Ordering::Relaxed);
        self.capture_saved_peak.store(before, Ordering::Relaxed);
    }

    /// The capture ended: how far the captured work's allocations rose above what was
    /// live when it began (what each replay needs on top of the memory live then).
    pub(crate) fn end_capture_window(&self) -> u64 {
        let peak = self.peak.load(Ordering::Relaxed);
        self.peak.fetch_max(
            self.capture_saved_peak.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        peak.saturating_sub(self.capture_base.load(Ordering::Relaxed))
    }

    /// A replay of a graph whose captured work rose `extra` bytes: the peak counts the
    /// memory live now plus that rise (graph memory is not allocated through the pool).
    pub(crate) fn replay_window(&self, extra: u64) {
        let used = self.used.load(Ordering::Relaxed);
        self.peak.fetch_max(used + extra, Ordering::Relaxed);
    }

    /// Makes the engine's context current on the calling thread (a thread-local setting of
    /// the driver; cheap). Every entry point that may run on a new thread calls it.
    pub(crate) fn bind(&self) -> Result<()> {
        unsafe { result::ctx::set_current(self.ctx) }.ctx("cuCtxSetCurrent")
    }
}

impl Drop for PoolState {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the process is ending its use of the GPU.
        unsafe {
            let _ = result::ctx::set_current(self.ctx);
            let _ = result::stream::synchronize(self.stream);
            let _ = result::stream::destroy(self.stream);
        }
    }
}

/// One device allocation (untyped bytes). Freed stream-ordered on drop, from any thread.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    pool: Arc<PoolState>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} B)", self.ptr, self.bytes)
    }
}

impl DeviceBuffer {
    pub(crate) fn alloc(pool: &Arc<PoolState>, bytes: usize) -> Result<DeviceBuffer> {
        if bytes == 0 {
            return Err(Error::invalid("buffer bytes", 0, "must be >= 1"));
        }
        let ptr = unsafe { result::mem_pool::alloc_async(pool.pool, bytes, pool.stream) }
            .ctx("cuMemAllocFromPoolAsync")?;
        let used = pool.used.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        pool.peak.fetch_max(used, Ordering::Relaxed);
        Ok(DeviceBuffer {
            ptr,
            bytes,
            pool: pool.clone(),
        })
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl DeviceBuffer {
    /// Frees the buffer stream-ordered on `stream` instead of the engine's stream (after
    /// the work queued there, e.g. an offload copy reading it).
    pub(crate) fn free_on(self, stream: sys::CUstream) {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never dropped, so the pool handle is moved out exactly once.
        let pool = unsafe { std::ptr::read(&me.pool) };
        unsafe {
            let _ = result::ctx::set_current(pool.ctx);
            let _ = result::free_async(me.ptr, stream);
        }
        pool.used.fetch_sub(me.bytes as u64, Ordering::Relaxed);
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        unsafe {
            let _ = result::ctx::set_current(self.pool.ctx);
            let _ = result::free_async(self.ptr, self.pool.stream);
        }
        self.pool
            .used
            .fetch_sub(self.bytes as u64, Ordering::Relaxed);
    }
}

/// Device memory an op can read or write: an owned [`DeviceBuffer`] or a borrowed
/// [`DeviceView`] into one (e.g. a tensor's elements from its offset).
pub trait DeviceMem {
    /// The device address.
    fn ptr(&self) -> u64;
    /// Size in bytes.
    fn bytes(&self) -> usize;
}

impl DeviceMem for DeviceBuffer {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A borrowed range of device memory (address and length), valid for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    ptr: u64,
    bytes: usize,
    _owner: std::marker::PhantomData<&'a DeviceBuffer>,
}

impl DeviceView<'_> {
    /// A view of `bytes` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr .. ptr + bytes` must lie in a live allocation of the engine's context for as long
    /// as the view (and any work queued with it) is used.
    pub unsafe fn from_raw<'a>(ptr: u64, bytes: usize) -> DeviceView<'a> {
        DeviceView {
            ptr,
            bytes,
            _owner: std::marker::PhantomData,
        }
    }
}

impl DeviceBuffer {
    /// The whole buffer as a view.
    pub fn view(&self) -> DeviceView<'_> {
        DeviceView {
            ptr: self.ptr,
            bytes: self.bytes,
            _owner: std::marker::PhantomData,
        }
    }
}

impl DeviceMem for DeviceView<'_> {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}
