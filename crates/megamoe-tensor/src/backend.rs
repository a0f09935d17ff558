//! The backend seam: every op reaches its kernels through a [`Backend`], picked from the
//! tensor's storage in ONE place ([`Tensor::backend`]; [`backend_for`] for constructors).
//!
//! # Contract
//! A backend is one implementation of every kernel family trait, gathered by the
//! [`Backend`] supertrait: [`HostTransfer`] (allocation, host copies, casts),
//! [`ElementwiseKernels`], [`ScalarKernels`], [`ReduceKernels`], [`SoftmaxKernels`],
//! [`NormKernels`], [`RopeKernels`], [`LossKernels`], [`TopkKernels`], [`IndexKernels`],
//! [`MatmulKernels`], [`ResidualKernels`], [`StackedKernels`], [`AttentionKernels`], [`RoutingKernels`], [`CapacityKernels`], [`OptimKernels`],
//! [`RngKernels`]. No method has a default body (except [`ResidualKernels`]' and [`StackedKernels`]': the unfused
//! ops they fuse), so a backend that misses a kernel does not compile: adding CUDA means `impl <Family> for CudaBackend` for each family, a
//! `Storage::Cuda` variant behind feature `cuda`, and one arm in [`Tensor::backend`] and
//! [`backend_for`].
//!
//! - **Inputs** are tensors (a storage plus a [`Layout`](crate::Layout): shape and element
//!   offset, contiguous row-major from the offset), already validated by the op in
//!   `ops/<family>.rs`: shapes, dtypes and devices agree, so a backend checks nothing the
//!   op checked. Index validity that needs element values (ids in range) is the backend's
//!   job (the CPU backend checks on the host; a device backend may check on the device or
//!   only in debug builds).
//! - **Outputs** are fresh tensors on the backend's own device, contiguous from offset 0
//!   ([`Tensor::from_storage`]); in-place kernels take `&mut Tensor` and write through
//!   [`Tensor`]'s copy-on-write (a shared buffer is copied first).
//! - **Element types**: f32 is the compute type; bf16 inputs are read widened to f32
//!   (storage-only bf16); integer inputs (ids, counts, group sizes) are i32.
//! - **No host slices** cross the seam except in [`HostTransfer::upload`] /
//!   [`HostTransfer::to_host`] (host data as [`CpuStorage`]). Scalar arguments (`f32`,
//!   `usize`, op enums) are launch parameters, never element data.
//! - **Asynchrony**: a device backend may queue work on a stream and return at once; only
//!   `to_host` synchronises (and the op layer counts it in [`host_reads`](crate::host_reads)).
//! - **Determinism**: a backend gives the same bits for the same inputs on every run (the
//!   CPU backend also for any thread count).

use std::fmt::Debug;

use crate::ops::attention::AttentionKernels;
use crate::ops::capacity::CapacityKernels;
use crate::ops::elementwise::ElementwiseKernels;
use crate::ops::index::IndexKernels;
use crate::ops::loss::LossKernels;
use crate::ops::matmul::MatmulKernels;
use crate::ops::norm::NormKernels;
use crate::ops::optim::OptimKernels;
use crate::ops::reduce::ReduceKernels;
use crate::ops::residual::ResidualKernels;
use crate::ops::rng::RngKernels;
use crate::ops::rope::RopeKernels;
use crate::ops::routing::RoutingKernels;
use crate::ops::scalar::ScalarKernels;
use crate::ops::softmax::SoftmaxKernels;
use crate::ops::stacked::StackedKernels;
use crate::ops::topk::TopkKernels;
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Device, Result, Shape, Tensor};

/// Allocation, host transfer and dtype conversion: the only kernels that see host data.
pub trait HostTransfer {
    /// A tensor holding `data` (host elements, `data.len() == shape.numel()`, checked by
    /// the caller) on this backend's device.
    fn upload(&self, data: CpuStorage, shape: Shape) -> Result<Tensor>;
    /// `x`'s elements (its layout's range) as host data, same dtype. Synchronises.
    fn to_host(&self, x: &Tensor) -> Result<CpuStorage>;
    /// A tensor of `shape` with every element `value` (an integer in range for `I32`,
    /// checked by the caller).
    fn full(&self, shape: Shape, value: f32, dtype: DType) -> Result<Tensor>;
    /// `x` converted to `dtype` (≠ `x.dtype()`): f32↔bf16 round to nearest even,
    /// float→i32 truncates toward zero, i32→float exact up to 2^24.
    fn to_dtype(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;
    /// A copy of `x`'s elements in a buffer of its own.
    fn copy(&self, x: &Tensor) -> Result<Tensor>;
    /// A read-only i32 tensor holding `data` ([`Tensor::constant_i32`]); a backend may hand
    /// out one shared copy per content. By default an upload.
    fn constant_i32(&self, data: Vec<i32>, shape: Shape) -> Result<Tensor> {
        self.upload(CpuStorage::I32(data), shape)
    }
}

/// One compute backend: every kernel family for one kind of storage (see the module doc).
pub trait Backend:
    HostTransfer
    + ElementwiseKernels
    + ScalarKernels
    + ReduceKernels
    + SoftmaxKernels
    + NormKernels
    + RopeKernels
    + LossKernels
    + TopkKernels
    + IndexKernels
    + MatmulKernels
    + ResidualKernels
    + StackedKernels
    + AttentionKernels
    + RoutingKernels
    + CapacityKernels
    + OptimKernels
    + RngKernels
    + Debug
    + Send
    + Sync
{
    /// The device this backend allocates on.
    fn device(&self) -> Device;
}

/// The host backend: rayon-parallel slice kernels in `cpu/<family>.rs`, glued to tensors in
/// `cpu/backend/<family>.rs`. Deterministic for any thread count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }
}

/// The backend that allocates on `device`; [`Error::DeviceNotAvailable`](crate::Error)
/// when this build has none for it.
pub fn backend_for(device: Device) -> Result<&'static dyn Backend> {
    device.check_available()?;
    match device {
        Device::Cpu => Ok(&CpuBackend),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => Ok(crate::cuda::cuda_backend(i)?),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(crate::Error::DeviceNotAvailable {
            device,
            reason: "this build has no CUDA backend (feature `cuda`)",
        }),
    }
}

impl Tensor {
    /// The backend of this tensor's storage: the one place ops dispatch on [`Storage`].
    pub fn backend(&self) -> &'static dyn Backend {
        match self.storage() {
            Storage::Cpu(_) => &CpuBackend,
            // The storage exists, so its GPU's backend was opened when it was made.
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => match crate::cuda::cuda_backend(s.ordinal()) {
                Ok(b) => b,
                Err(_) => unreachable!("a CUDA buffer exists only once its backend opened"),
            },
        }
    }
}
