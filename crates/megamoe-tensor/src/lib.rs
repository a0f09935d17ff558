//! megamoe-tensor: the tensor type and the op set that every megamoe layer computes with.
//!
//! # Purpose
//! A small, explicit tensor engine for training MoE transformers: a [`Tensor`] handle on
//! backend [`Storage`], ops as methods that validate their inputs and dispatch to the
//! tensor's [`Backend`] (one trait per kernel family, see [`backend`]), and no autograd — layers call forward ops and the matching `*_backward` helpers
//! themselves (see ARCHITECTURE.md, principle 1).
//!
//! # Principal types
//! - [`Tensor`]: cheap-clone handle (`Arc` buffer + [`Layout`]: shape and element
//!   offset), contiguous row-major from its offset; `reshape`, `view` and contiguous
//!   `narrow`s share the buffer, other view-like ops copy.
//! - [`RowGroups`]: the row groups of a grouped GEMM as device tensors (no host sizes).
//! - [`DType`]: `F32` (all math), `BF16` (storage; widened on read), `I32` (indices).
//! - [`Device`]: `Cpu` today; `Cuda(i)` errors with [`Error::DeviceNotAvailable`].
//! - [`Storage`]/[`CpuStorage`]: the buffer enum; [`Tensor::backend`] maps it to its
//!   [`Backend`] ([`CpuBackend`] today), the one place ops dispatch.
//! - [`Error`]: one typed error enum; every variant names the op and the bad shapes/values.
//!
//! # Place in the workspace
//! Depends on no megamoe crate. Used by comm, moe, model, optim, pipeline, train, cli.
//!
//! # Conventions
//! - Shapes are written `[N, H]` outermost first; `N` tokens/rows, `H` hidden, `E` experts,
//!   `k` top-k, `T` sequence, `V` vocab, `G` groups.
//! - Every op returns a fresh tensor; inputs are never modified. The in-place ops
//!   (`add_assign`, `axpy`, `matmul_acc`) take `&mut self` and copy-on-write if shared.
//!   Backward helpers return gradients written fresh; accumulate with `add_assign`.
//! - Sync rule: ops assume asynchronous execution. Element values reach the host only via
//!   `to_host_f32`, `to_host_i32`, `to_host_bf16`, `to_scalar_f32` and
//!   `Tensor::to_host_batch_f32` (each marked SYNC); each call adds one to the
//!   process-wide [`host_reads`] counter. [`live_bytes`]/[`peak_bytes`] count the bytes of
//!   live tensor buffers.
//! - Determinism: every CPU op gives identical bits for any rayon thread count.
//! - Sums (reductions, softmax denominators, norms, cross-entropy) accumulate in f64.
//!
//! # Features
//! - `bench-faer`: adds faer to `benches/gemm.rs` to re-check the GEMM crate choice.
//! - (planned) `cuda`: a `Storage::Cuda` variant and a `CudaBackend` implementing every
//!   kernel family trait; a missing kernel is a compile error (see [`backend`]).
//!
//! GEMMs use the `gemm` crate with its `x86-v4` (AVX-512, runtime-detected) kernels; see
//! docs/perf.md for the benchmark behind the choice.
//!
//! # Example
//! ```
//! use megamoe_tensor::{Device, Tensor};
//! # fn main() -> megamoe_tensor::Result<()> {
//! // y = x · Wᵀ for x [2, 3], W [2, 3] (a Linear layer with 3 inputs and 2 outputs)
//! let x = Tensor::from_vec_f32(vec![1., 2., 3., 4., 5., 6.], [2, 3], Device::Cpu)?;
//! let w = Tensor::from_vec_f32(vec![1., 0., 0., 0., 1., 1.], [2, 3], Device::Cpu)?;
//! let y = x.matmul(&w, false, true)?;
//! assert_eq!(y.dims(), &[2, 2]);
//! assert_eq!(y.to_host_f32()?, vec![1., 5., 4., 11.]);
//! // router-style top-1 over the last dim: ties go to the lower index
//! let (vals, idx) = Tensor::from_vec_f32(vec![0.5, 0.5, 0.1], [1, 3], Device::Cpu)?.topk(1)?;
//! assert_eq!((vals.to_host_f32()?, idx.to_host_i32()?), (vec![0.5], vec![0]));
//! # Ok(())
//! # }
//! ```
//!
//! Benchmarks: `cargo bench -p megamoe-tensor` (results in docs/perf.md).
#![deny(missing_docs)]

pub mod backend;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod dtype;
mod error;
mod io;
mod memory;
mod offload;
pub mod ops;
mod shape;
mod storage;
mod sync;
mod tensor;
mod threads;
mod weight_copies;

pub use backend::{backend_for, Backend, CpuBackend};
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use half::bf16;
pub use io::{load_safetensors, save_safetensors};
pub use memory::{live_bytes, peak_bytes, reset_peak_bytes};
pub use offload::{parked_bytes, FetchedTensor, ParkedTensor};
pub use ops::elementwise::{BinaryOp, UnaryOp};
pub use ops::groups::RowGroups;
pub use ops::loss::IGNORE_INDEX;
pub use ops::norm::RmsNormResidualGrads;
pub use ops::optim::AdamWStep;
pub use ops::rng::InitDist;
pub use shape::Shape;
pub use storage::{CpuStorage, Storage};
pub use sync::host_reads;
pub use tensor::{Layout, Tensor, READ_DEFERRED};
pub use threads::on_compute_threads;
pub use weight_copies::WeightCopies;
