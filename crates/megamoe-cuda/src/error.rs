//! The crate's error type: every failure names what failed and why.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to the GPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CUDA library is not loadable on this machine (the binary itself has no CUDA in it).
    #[error("CUDA driver not found: build has feature cuda but no GPU/driver on this machine (could not load {library})")]
    NoDriver {
        /// The library that could not be loaded (libcuda, libnvrtc, libcublas, libcublasLt).
        library: &'static str,
    },
    /// A driver call failed.
    #[error("CUDA driver call {call} failed: {source:?}")]
    Driver {
        /// What was being done.
        call: &'static str,
        /// The driver's error.
        source: DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS {call} failed: {source:?}")]
    Cublas {
        /// Which call.
        call: &'static str,
        /// cuBLAS's status.
        source: CublasError,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt {call} failed: {source:?}")]
    CublasLt {
        /// Which call.
        call: &'static str,
        /// cuBLASLt's status.
        source: cudarc::cublaslt::result::CublasError,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {module}: {log}")]
    Compile {
        /// The kernel module.
        module: String,
        /// The compiler log.
        log: String,
    },
    /// No CUDA headers were found for NVRTC.
    #[error("CUDA headers not found: NVRTC needs cuda_bf16.h; looked in {searched} (set CUDA_HOME or CUDA_PATH)")]
    NoHeaders {
        /// The directories looked in.
        searched: String,
    },
    /// libcudnn cannot be loaded (cuDNN fused attention is unavailable; callers fall back).
    #[error("libcudnn not found: cuDNN fused attention needs libcudnn.so.9 on the loader path (LD_LIBRARY_PATH; the nvidia-cudnn pip wheel keeps it in site-packages/nvidia/cudnn/lib)")]
    NoCudnn,
    /// A cuDNN call failed.
    #[error("cuDNN {call} failed: {status} ({detail})")]
    Cudnn {
        /// Which call.
        call: &'static str,
        /// cuDNN's status.
        status: String,
        /// cuDNN's last error message.
        detail: String,
    },
    /// cuDNN has no engine for an operation graph.
    #[error("cuDNN has no execution plan for the {what} graph ({tried} engine configs tried; last error: {last})")]
    CudnnNoPlan {
        /// Which graph.
        what: &'static str,
        /// Engine configurations tried.
        tried: usize,
        /// The last failure.
        last: String,
    },
    /// A shape or parameter outside what a kernel supports.
    #[error("invalid {field} = {value}: {rule}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A host buffer does not match the device buffer it is copied to or from.
    #[error("{what}: host has {host} elements, device buffer {device}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Host elements.
        host: usize,
        /// Device elements.
        device: usize,
    },
}

impl Error {
    /// An [`Error::Invalid`].
    pub fn invalid(field: &'static str, value: impl ToString, rule: &'static str) -> Error {
        Error::Invalid {
            field,
            value: value.to_string(),
            rule,
        }
    }
}

/// Maps a driver result into [`Error::Driver`] naming the call.
pub(crate) trait DriverCtx<T> {
    fn ctx(self, call: &'static str) -> Result<T>;
}

impl<T> DriverCtx<T> for std::result::Result<T, DriverError> {
    fn ctx(self, call: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { call, source })
    }
}

impl<T> DriverCtx<T> for std::result::Result<T, CublasError> {
    fn ctx(self, call: &'static str) -> Result<T> {
        self.map_err(|source| Error::Cublas { call, source })
    }
}

impl<T> DriverCtx<T> for std::result::Result<T, cudarc::cublaslt::result::CublasError> {
    fn ctx(self, call: &'static str) -> Result<T> {
        self.map_err(|source| Error::CublasLt { call, source })
    }
}
