//! cuDNN's fused attention through its backend graph API ([`CudnnSdpa`]).
//!
//! cuDNN is loaded at run time like every CUDA library here (cudarc `dynamic-loading`):
//! [`cudnn_present`] says whether `libcudnn.so.9` can be loaded, and [`CudnnSdpa::new`]
//! returns [`crate::Error::NoCudnn`] (one line) where it cannot, so callers fall back to
//! another attention path by name. cuDNN ships as the `nvidia-cudnn` pip wheel (the one
//! PyTorch uses) under `site-packages/nvidia/cudnn/lib`, which is not on the loader path:
//! put it on `LD_LIBRARY_PATH`.
//!
//! [`graph`] is a small builder over the backend descriptors (tensors, pointwise, matmul,
//! reduction and reshape operations, operation graph, heuristics, execution plan, variant
//! pack); [`sdpa`] describes the forward and backward attention graphs with it. A plan is
//! built once per shape and cached; each call only fills a variant pack and queues the
//! plan on the engine's stream with a workspace from the stream-ordered pool, so the
//! calls can be captured in a CUDA graph.

mod graph;
mod sdpa;

pub use sdpa::{CudnnSdpa, SdpaLayout, SdpaShape};

use std::ffi::CStr;

use cudarc::cudnn::sys as nsys;

use crate::error::{Error, Result};

/// Whether libcudnn can be loaded on this machine.
pub fn cudnn_present() -> bool {
    // SAFETY: only tries to dlopen the library candidates.
    unsafe { nsys::is_culib_present() }
}

/// The loaded cuDNN's version (e.g. 91900 for 9.19.0). Needs [`cudnn_present`].
pub(crate) fn version() -> usize {
    // SAFETY: a plain query; the library is loaded (checked by the callers).
    unsafe { nsys::cudnnGetVersion() }
}

/// Maps a cuDNN status to [`Error::Cudnn`] naming the call, with cuDNN's own last message.
pub(crate) fn check(status: nsys::cudnnStatus_t, call: &'static str) -> Result<()> {
    if status == nsys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: cuDNN writes a NUL-terminated message of at most `len` bytes into `buf`.
    let detail = unsafe {
        let mut buf = [0 as std::ffi::c_char; 512];
        nsys::cudnnGetLastErrorString(buf.as_mut_ptr(), buf.len());
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    };
    Err(Error::Cudnn {
        call,
        status: format!("{status:?}"),
        detail,
    })
}

/// A cuDNN handle bound to the engine's stream.
pub(crate) struct Handle(nsys::cudnnHandle_t);

impl Handle {
    /// A handle whose work goes to `stream` (the context must be current).
    pub(crate) fn new(stream: cudarc::driver::sys::CUstream) -> Result<Handle> {
        if !cudnn_present() {
            return Err(Error::NoCudnn);
        }
        let mut h = std::ptr::null_mut();
        // SAFETY: cudnnCreate writes a handle; the stream belongs to the current context.
        unsafe {
            check(nsys::cudnnCreate(&mut h), "cudnnCreate")?;
            let handle = Handle(h);
            check(
                nsys::cudnnSetStream(h, stream as nsys::cudaStream_t),
                "cudnnSetStream",
            )?;
            Ok(handle)
        }
    }

    pub(crate) fn raw(&self) -> nsys::cudnnHandle_t {
        self.0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cudnnCreate and is destroyed once.
        unsafe {
            let _ = nsys::cudnnDestroy(self.0);
        }
    }
}
