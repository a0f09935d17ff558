//! The engine: one GPU, one stream, one cuBLAS handle, the memory pool and the kernel cache.
//!
//! Every library is loaded at run time (cudarc `dynamic-loading`): [`probe`] checks that
//! each one can be loaded before any call, so a machine without a driver gets
//! [`Error::NoDriver`] (one line) instead of a panic inside cudarc.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as bres, sys as bsys};
use cudarc::driver::{result as dres, sys as dsys};

use crate::error::{DriverCtx, Error, Result};
use crate::nvrtc::KernelCache;
use crate::pool::{DeviceBuffer, DeviceMem, PoolState, PoolStats};

/// Bytes of the cuBLAS workspace given to the handle (fixed, so GEMMs can be captured;
/// allocated from the pool when the engine opens).
pub const CUBLAS_WORKSPACE: usize = 64 << 20;

/// What the device reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal.
    pub ordinal: usize,
    /// Marketing name (e.g. "NVIDIA H200").
    pub name: String,
    /// Compute capability.
    pub compute_capability: (i32, i32),
    /// Multiprocessors.
    pub multiprocessors: i32,
    /// Device memory, bytes.
    pub total_memory: u64,
    /// Driver API version (e.g. 13000).
    pub driver_version: i32,
}

/// A library name and cudarc's check that it loads.
type LibCheck = (&'static str, unsafe fn() -> bool);

/// Checks that libcuda, NVRTC, cuBLAS and cuBLASLt can be loaded.
pub fn probe() -> Result<()> {
    let checks: [LibCheck; 4] = [
        ("libcuda", cudarc::driver::sys::is_culib_present),
        ("libnvrtc", cudarc::nvrtc::sys::is_culib_present),
        ("libcublas", cudarc::cublas::sys::is_culib_present),
        ("libcublasLt", cudarc::cublaslt::sys::is_culib_present),
    ];
    for (library, present) in checks {
        if !unsafe { present() } {
            return Err(Error::NoDriver { library });
        }
    }
    Ok(())
}

/// One GPU with its stream, cuBLAS handle, pool and kernel cache. `Send` but not `Sync`
/// (a cuBLAS handle must not be used by two threads at once): share it behind a mutex, and
/// call [`Gpu::bind`] after moving it to another thread.
pub struct Gpu {
    info: DeviceInfo,
    pub(crate) pool: Arc<PoolState>,
    pub(crate) blas: bsys::cublasHandle_t,
    pub(crate) kernels: KernelCache,
    /// cuBLASLt (bf16 GEMMs, `gemm_lt.rs`); shares the cuBLAS workspace.
    pub(crate) lt: crate::gemm_lt::LtState,
    /// Side streams for independent GEMMs (`lanes.rs`), made on first use.
    pub(crate) lanes: crate::lanes::LaneState,
    _blas_workspace: DeviceBuffer,
}

// SAFETY: every field is a driver / cuBLAS handle or owned data. Driver handles are valid
// from any thread once the context is current (`bind`); the cuBLAS handle is used by one
// thread at a time because `Gpu` is not `Sync` and its methods take `&self` / `&mut self`.
unsafe impl Send for Gpu {}

impl Gpu {
    /// Makes this GPU's context current on the calling thread (needed once per thread that
    /// uses a `Gpu` it did not create).
    pub fn bind(&self) -> Result<()> {
        self.pool.bind()
    }

    /// Opens GPU `ordinal`: primary context, a non-blocking stream (capturable), the
    /// device's memory pool and a cuBLAS handle bound to the stream.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        probe()?;
        dres::init().ctx("cuInit")?;
        let count = dres::device::get_count().ctx("cuDeviceGetCount")?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::invalid(
                "device ordinal",
                ordinal,
                "must be below the number of GPUs on this machine",
            ));
        }
        let dev = dres::device::get(ordinal as i32).ctx("cuDeviceGet")?;
        let ctx = unsafe { dres::primary_ctx::retain(dev) }.ctx("cuDevicePrimaryCtxRetain")?;
        unsafe { dres::ctx::set_current(ctx) }.ctx("cuCtxSetCurrent")?;
        let attr = |a| unsafe { dres::device::get_attribute(dev, a) }.ctx("cuDeviceGetAttribute");
        use dsys::CUdevice_attribute as A;
        let cc = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let mut driver_version = 0;
        unsafe { dsys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .ctx("cuDriverGetVersion")?;
        let info = DeviceInfo {
            ordinal,
            name: dres::device::get_name(dev).ctx("cuDeviceGetName")?,
            compute_capability: cc,
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            total_memory: unsafe { dres::device::total_mem(dev) }.ctx("cuDeviceTotalMem")? as u64,
            driver_version,
        };
        let stream =
            dres::stream::create(dres::stream::StreamKind::NonBlocking).ctx("cuStreamCreate")?;
        let pool = Arc::new(PoolState::new(ctx, dev, stream)?);
        let path = crate::gemm_lt::GemmPath::from_env()?;
        let blas = bres::create_handle().ctx("cublasCreate")?;
        let workspace = DeviceBuffer::alloc(&pool, CUBLAS_WORKSPACE)?;
        let lt = crate::gemm_lt::LtState::new((workspace.ptr(), CUBLAS_WORKSPACE), path)?;
        unsafe {
            bres::set_stream(blas, stream as bsys::cudaStream_t).ctx("cublasSetStream")?;
            bsys::cublasSetWorkspace_v2(blas, workspace.ptr() as *mut c_void, CUBLAS_WORKSPACE)
                .result()
                .ctx("cublasSetWorkspace")?;
            bsys::cublasSetMathMode(blas, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .ctx("cublasSetMathMode")?;
        }
        Ok(Gpu {
            info,
            pool,
            blas,
            kernels: KernelCache::new(cc.0, cc.1),
            lt,
            lanes: Default::default(),
            _blas_workspace: workspace,
        })
    }

    /// What the device reports.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The engine's stream (raw handle).
    pub fn stream(&self) -> dsys::CUstream {
        self.pool.stream
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        unsafe { dres::stream::synchronize(self.pool.stream) }.ctx("cuStreamSynchronize")
    }

    /// A stream-ordered allocation of `bytes` (uninitialised).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        DeviceBuffer::alloc(&self.pool, bytes)
    }

    /// Pool counters (reserved / used / peak bytes).
    pub fn pool_stats(&self) -> Result<PoolStats> {
        self.pool.stats()
    }

    /// Starts a new peak window at the current use.
    pub fn reset_peak(&self) {
        self.pool.reset_peak()
    }

    /// Seconds spent compiling kernels with NVRTC so far.
    pub fn compile_secs(&self) -> f64 {
        self.kernels.compile_secs
    }

    /// Copies `src` to the start of `dst` (stream-ordered; `src` must outlive the copy, so
    /// this synchronizes before returning).
    pub fn upload<T: Copy>(&self, dst: &impl DeviceMem, src: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        if bytes > dst.bytes() {
            return Err(Error::Length {
                what: "upload",
                host: bytes,
                device: dst.bytes(),
            });
        }
        unsafe { dres::memcpy_htod_async(dst.ptr(), src, self.pool.stream) }
            .ctx("cuMemcpyHtoDAsync")?;
        self.synchronize()
    }

    /// Copies the start of `src` into `dst` (SYNC: waits for the stream).
    pub fn download<T: Copy>(&self, src: &impl DeviceMem, dst: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(dst);
        if bytes > src.bytes() {
            return Err(Error::Length {
                what: "download",
                host: bytes,
                device: src.bytes(),
            });
        }
        unsafe { dres::memcpy_dtoh_async(dst, src.ptr(), self.pool.stream) }
            .ctx("cuMemcpyDtoHAsync")?;
        self.synchronize()
    }

    /// Copies `height` rows of `width` bytes, row `r` from `src + r·src_pitch` to
    /// `dst + r·dst_pitch` (stream-ordered device-to-device copy; narrow and concatenation
    /// along an inner dimension).
    ///
    /// # Safety
    /// Both address ranges must lie in live allocations of this engine's context.
    pub unsafe fn copy_2d(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<()> {
        if width == 0 || height == 0 {
            return Ok(());
        }
        let p = dsys::CUDA_MEMCPY2D_st {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: dsys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: dsys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: width,
            Height: height,
        };
        dsys::cuMemcpy2DAsync_v2(&p, self.pool.stream)
            .result()
            .ctx("cuMemcpy2DAsync")
    }

    /// Fills `dst` with the byte `value` (stream-ordered).
    pub fn memset(&self, dst: &DeviceBuffer, value: u8) -> Result<()> {
        unsafe { dres::memset_d8_async(dst.ptr(), value, dst.bytes(), self.pool.stream) }
            .ctx("cuMemsetD8Async")
    }

    /// Launches `f` on the stream. `params` point at the kernel's arguments in order.
    ///
    /// # Safety
    /// `params` must match the kernel's signature and every pointer in them must be a live
    /// device allocation large enough for what the kernel touches.
    pub(crate) unsafe fn launch(
        &self,
        f: dsys::CUfunction,
        grid: u32,
        block: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        dres::launch_kernel(
            f,
            (grid.max(1), 1, 1),
            (block, 1, 1),
            0,
            self.pool.stream,
            params,
        )
        .ctx("cuLaunchKernel")
    }

    /// [`Gpu::launch`] with a 2-D grid `(x, y)` and `shared` bytes of dynamic shared memory.
    ///
    /// # Safety
    /// As [`Gpu::launch`]; `shared` must not exceed the function's dynamic shared-memory
    /// limit.
    pub(crate) unsafe fn launch_2d(
        &self,
        f: dsys::CUfunction,
        grid: (u32, u32),
        block: u32,
        shared: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        dres::launch_kernel(
            f,
            (grid.0.max(1), grid.1.max(1), 1),
            (block, 1, 1),
            shared,
            self.pool.stream,
            params,
        )
        .ctx("cuLaunchKernel")
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::stream::synchronize(self.pool.stream);
            let _ = bres::destroy_handle(self.blas);
        }
    }
}

/// A timing event recorded on the stream (a profiling marker, see [`Gpu::mark`]).
pub struct Marker(dsys::CUevent);

// SAFETY: an event handle is valid from any thread where its context is current.
unsafe impl Send for Marker {}

impl Gpu {
    /// Records a timing event on the stream now: it completes when every kernel queued
    /// before it has run.
    pub fn mark(&self) -> Result<Marker> {
        let ev = dres::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT).ctx("cuEventCreate")?;
        let m = Marker(ev);
        unsafe { dres::event::record(m.0, self.stream()) }.ctx("cuEventRecord")?;
        Ok(m)
    }
}

impl Marker {
    /// Milliseconds of stream time from `earlier` to this marker (both must have completed:
    /// synchronize first).
    pub fn ms_since(&self, earlier: &Marker) -> Result<f32> {
        unsafe { dres::event::elapsed(earlier.0, self.0) }.ctx("cuEventElapsedTime")
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::event::destroy(self.0);
        }
    }
}

/// A pair of timing events on the engine's stream.
pub struct EventTimer {
    start: dsys::CUevent,
    end: dsys::CUevent,
}

impl EventTimer {
    /// Two events with timing enabled.
    pub fn new() -> Result<EventTimer> {
        let f = dsys::CUevent_flags::CU_EVENT_DEFAULT;
        Ok(EventTimer {
            start: dres::event::create(f).ctx("cuEventCreate")?,
            end: dres::event::create(f).ctx("cuEventCreate")?,
        })
    }

    /// Records the start event.
    pub fn start(&self, gpu: &Gpu) -> Result<()> {
        unsafe { dres::event::record(self.start, gpu.stream()) }.ctx("cuEventRecord")
    }

    /// Records the end event, waits for it and returns the milliseconds in between.
    pub fn stop_ms(&self, gpu: &Gpu) -> Result<f32> {
        unsafe {
            dres::event::record(self.end, gpu.stream()).ctx("cuEventRecord")?;
            dres::event::synchronize(self.end).ctx("cuEventSynchronize")?;
            dres::event::elapsed(self.start, self.end).ctx("cuEventElapsedTime")
        }
    }
}

impl Drop for EventTimer {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::event::destroy(self.start);
            let _ = dres::event::destroy(self.end);
        }
    }
}

/// A kernel argument: a pointer to the value, as `cuLaunchKernel` takes them.
pub(crate) fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}
