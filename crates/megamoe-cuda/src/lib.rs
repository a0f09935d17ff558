//! megamoe-cuda: the CUDA engine of megamoe — one GPU, its stream, the NVRTC kernel cache,
//! cuBLAS GEMMs (bf16 and f32, strided-batched), the stream-ordered memory pool with
//! reserved / used / peak counters, CUDA graph capture, and the MoE layer's kernels
//! (router, capacity assignment, permute, SwiGLU, combine, and their backward), and the
//! kernels of the rest of a training step ([`ops`]: RMSNorm, RoPE, cross-entropy,
//! embedding, causal attention, AdamW), the kernels behind megamoe-tensor's op
//! families for a tensor backend ([`tensor`]), and activation offload to pinned host
//! memory on a copy stream ([`CopyStream`]).
//!
//! # Place in the workspace
//! Knows nothing of `megamoe_tensor::Tensor`: it moves device buffers and launches work.
//! Only built where a user crate turns its `cuda` feature on (megamoe-cli's `megamoe
//! bench moe`). cudarc loads every CUDA library at run time, so this crate builds on a
//! machine with no CUDA; there [`Gpu::new`] returns [`Error::NoDriver`] (one line).
//!
//! # Conventions
//! - Row-major everywhere; the GEMM wrapper maps to cuBLAS's column-major ([`gemm`]).
//! - Storage is bf16 or f32 ([`Elem`]); math and every reduction are f32, in a fixed
//!   order (no float atomics): results are bitwise reproducible run to run.
//! - Every host read is a method whose doc says SYNC.
//!
//! # Example
//! ```no_run
//! # fn main() -> megamoe_cuda::Result<()> {
//! let gpu = megamoe_cuda::Gpu::new(0)?; // Err(NoDriver) where there is no GPU
//! println!("{} sm_{}{}", gpu.info().name, gpu.info().compute_capability.0, gpu.info().compute_capability.1);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod bench;
pub mod cudnn;
mod device;
mod error;
pub mod gemm;
pub mod gemm_bucket;
pub mod gemm_lt;
mod graph;
mod lanes;
pub mod moe;
mod nvrtc;
mod offload;
pub mod ops;
mod pool;
pub mod tensor;

pub use cudnn::{cudnn_present, CudnnSdpa, SdpaLayout, SdpaShape};
pub use device::{probe, DeviceInfo, EventTimer, Gpu, Marker, CUBLAS_WORKSPACE};
pub use error::{Error, Result};
pub use gemm::{Elem, Operand};
pub use gemm_bucket::Varying;
pub use gemm_lt::{GemmPath, GEMM_PATH_VAR};
pub use graph::{Graph, PinnedHost};
pub use lanes::{GemmLanes, MAX_LANES};
pub use moe::{CudaMoe, MoeGrads, MoeHostWeights, MoeShape, RouterSpec, Score};
pub use nvrtc::cuda_include_dir;
pub use offload::{CopyStream, Fetched, Parked};
pub use ops::{
    AdamWParams, AdamWSegment, AttentionGrads, AttentionShape, FlashAttention, Moments, Ops,
    SegmentTable,
};
pub use pool::{DeviceBuffer, DeviceMem, DeviceView, PoolStats};
