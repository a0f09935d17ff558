//! The CUDA backend (feature `cuda`): [`CudaStorage`] buffers from megamoe-cuda's
//! stream-ordered pool and a [`CudaBackend`] per GPU implementing every kernel family with
//! megamoe-cuda's kernels (`megamoe_cuda::tensor` for the generic families, `ops` for
//! RMSNorm / RoPE / cross-entropy / AdamW, cuBLAS for the matmuls).
//!
//! # Engine and threads
//! One engine per GPU ordinal (context, stream, cuBLAS handle, kernel modules), opened on
//! first use and kept for the process, behind a mutex: kernels are queued on the engine's
//! one stream in call order, so every op is ordered after the ops that produced its inputs,
//! and no host synchronisation happens except in `to_host` and the host-staged ops below.
//!
//! # MoE on the device
//! The MoE routing and capacity families run on the device (`routing.rs`: no host read
//! except the dropless sort's one counts read per layer), and grouped matmuls over
//! fixed-stride groups (static capacity) are strided-batched GEMMs (`grouped.rs`). Index
//! checks of these kernels run in every build and are reported at the next synchronising
//! read (`to_host`).
//!
//! # Host-staged ops
//! Grouped matmuls over packed groups need the group sizes on the host (given by the
//! groups, as the dropless MoE layer's one counts read per layer, or one counted read per
//! call) to plan the GEMMs (`grouped.rs`); the named RNG is drawn on the host and uploaded.

mod attention;
pub use attention::AttentionPath;
mod dense;
mod elementwise;
mod flat_optim;
pub use flat_optim::OptimizerSegments;
mod graph;
pub use graph::{device_address, StepGraph};
mod grouped;
pub use grouped::set_group_gemms;
mod host;
mod matmul;
mod residual;
/// Bytes every GPU engine takes from its pool when it opens (the cuBLAS workspace).
pub const ENGINE_POOL_BYTES: usize = megamoe_cuda::CUBLAS_WORKSPACE;
pub(crate) mod offload;
mod routing;
mod stacked;
mod staged;
mod weights;
pub use weights::{WeightCopyStats, WrittenCopies};

use std::sync::{Mutex, MutexGuard, OnceLock};

use megamoe_cuda::tensor::{Dev, Dtype, GroupKernels, RouteKernels, TensorKernels};
use megamoe_cuda::{DeviceBuffer, DeviceView, Elem, Gpu, Ops};

use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Shape, Tensor};

/// A buffer on a GPU: device memory from the engine's pool, its element type and count.
#[derive(Debug)]
pub struct CudaStorage {
    buf: DeviceBuffer,
    dtype: DType,
    len: usize,
    ordinal: usize,
}

impl CudaStorage {
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The GPU ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
}

/// The engine of one GPU (see the module doc).
pub(crate) struct Engine {
    pub(crate) gpu: Gpu,
    pub(crate) tk: TensorKernels,
    /// MoE routing / capacity / static-buffer kernels.
    pub(crate) rk: RouteKernels,
    /// Row-group copies around the strided-batched grouped GEMMs (`grouped.rs`).
    pub(crate) gk: GroupKernels,
    /// The device error record of the index checks (four i32, zero when clean).
    pub(crate) err: DeviceBuffer,
    pub(crate) ops_f32: Ops,
    pub(crate) ops_bf16: Ops,
    /// Op-time markers (`MEGAMOE_CUDA_PROFILE` set): one stream event per engine use,
    /// named by the op (see [`CudaBackend::profile_report`]).
    profile: Option<Vec<(&'static str, megamoe_cuda::Marker)>>,
    /// While a step is being captured (see `graph.rs`): the pinned host copies its uploads
    /// read, kept for the graph's life.
    pub(crate) capture: Option<Vec<megamoe_cuda::PinnedHost>>,
    /// Fused attention kernels, one per head dim used so far.
    pub(crate) flash: Vec<megamoe_cuda::FlashAttention>,
    /// cuDNN's fused attention: opened on first use (`Err` says why it is unavailable).
    pub(crate) cudnn: Option<std::result::Result<megamoe_cuda::CudnnSdpa, String>>,
}

impl Engine {
    /// The step kernels for activations of `dtype` (bf16 storage or f32).
    pub(crate) fn ops(&self, dtype: DType) -> &Ops {
        if dtype == DType::BF16 {
            &self.ops_bf16
        } else {
            &self.ops_f32
        }
    }
}

/// The backend of GPU `ordinal`.
pub struct CudaBackend {
    ordinal: usize,
    engine: Mutex<Engine>,
    /// Matmuls round both operands to bf16 (f32 accumulation and result), see
    /// [`CudaBackend::set_bf16_matmul`].
    bf16_matmul: std::sync::atomic::AtomicBool,
    /// Activations and their gradients are written bf16, see
    /// [`CudaBackend::set_bf16_activations`].
    bf16_activations: std::sync::atomic::AtomicBool,
    /// The attention path asked for, see [`CudaBackend::set_attention`].
    pub(crate) attention: std::sync::atomic::AtomicU8,
    /// Stacked projections run as one GEMM where their operands allow, see
    /// [`CudaBackend::set_joint_projections`].
    pub(crate) joint_projections: std::sync::atomic::AtomicBool,
    /// bf16 copies of the registered f32 weights (`weights.rs`).
    weights: Mutex<weights::WeightCache>,
    /// Shape-only i32 constants by (shape, content), [`Tensor::constant_i32`] (`host.rs`).
    constants: Mutex<host::Constants>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{})", self.ordinal)
    }
}

/// GPUs a process can address through this backend.
const MAX_GPUS: usize = 16;

#[allow(clippy::declare_interior_mutable_const)]
const UNOPENED: OnceLock<std::result::Result<CudaBackend, String>> = OnceLock::new();
static BACKENDS: [OnceLock<std::result::Result<CudaBackend, String>>; MAX_GPUS] =
    [UNOPENED; MAX_GPUS];

/// The backend of GPU `ordinal`, opening its engine on first use. A machine without a
/// driver or GPU gets [`Error::DeviceNotAvailable`]-style [`Error::Cuda`] naming why.
pub fn cuda_backend(ordinal: usize) -> Result<&'static CudaBackend> {
    let device = Device::Cuda(ordinal);
    let slot = BACKENDS.get(ordinal).ok_or(Error::DeviceNotAvailable {
        device,
        reason: "GPU ordinal above the 16 this backend addresses",
    })?;
    let opened = slot.get_or_init(|| open(ordinal).map_err(|e| e.to_string()));
    opened.as_ref().map_err(|message| Error::Cuda {
        op: "open GPU",
        device,
        message: message.clone(),
    })
}

fn open(ordinal: usize) -> megamoe_cuda::Result<CudaBackend> {
    let mut gpu = Gpu::new(ordinal)?;
    let tk = TensorKernels::new(&mut gpu)?;
    let rk = RouteKernels::new(&mut gpu)?;
    let gk = GroupKernels::new(&mut gpu)?;
    let err = gpu.alloc(16)?;
    gpu.memset(&err, 0)?;
    let ops_f32 = Ops::new(&mut gpu, Elem::F32)?;
    let ops_bf16 = Ops::new(&mut gpu, Elem::Bf16)?;
    Ok(CudaBackend {
        ordinal,
        engine: Mutex::new(Engine {
            gpu,
            tk,
            rk,
            gk,
            err,
            ops_f32,
            ops_bf16,
            profile: std::env::var_os("MEGAMOE_CUDA_PROFILE").map(|_| Vec::new()),
            capture: None,
            flash: Vec::new(),
            cudnn: None,
        }),
        bf16_matmul: std::sync::atomic::AtomicBool::new(false),
        bf16_activations: std::sync::atomic::AtomicBool::new(false),
        attention: std::sync::atomic::AtomicU8::new(attention::from_env() as u8),
        joint_projections: std::sync::atomic::AtomicBool::new(stacked::joint_from_env()),
        weights: Mutex::new(weights::WeightCache::default()),
        constants: Mutex::new(host::Constants::default()),
    })
}

impl crate::backend::Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
}

impl CudaBackend {
    /// The engine, locked, with its context current on this thread.
    pub(crate) fn engine(&self, op: &'static str) -> Result<MutexGuard<'_, Engine>> {
        let mut e = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        e.gpu.bind().map_err(|err| self.err(op, err))?;
        let Engine { gpu, profile, .. } = &mut *e;
        if let Some(markers) = profile.as_mut() {
            markers.push((op, gpu.mark().map_err(|err| self.err(op, err))?));
        }
        Ok(e)
    }

    /// With `MEGAMOE_CUDA_PROFILE` set: the stream time since the last report (or since the
    /// engine opened) attributed to op names, `(op, ms, uses)` by descending time. Each
    /// engine use records an event, so an op's share is the stream time from its first
    /// kernel to the next op's (exact while the GPU is busy; host gaps count to the op
    /// before them). Synchronises. Empty without the variable.
    pub fn profile_report(&self) -> Result<Vec<(&'static str, f64, usize)>> {
        let mut e = self.engine("profile_report")?;
        e.gpu
            .synchronize()
            .map_err(|err| self.err("profile_report", err))?;
        let Some(markers) = e.profile.as_mut() else {
            return Ok(Vec::new());
        };
        let mut by_op: Vec<(&'static str, f64, usize)> = Vec::new();
        // the last marker is this report's own engine use
        for w in markers.windows(2) {
            let ms = w[1]
                .1
                .ms_since(&w[0].1)
                .map_err(|err| self.err("profile_report", err))?;
            match by_op.iter_mut().find(|(n, _, _)| *n == w[0].0) {
                Some(entry) => {
                    entry.1 += ms as f64;
                    entry.2 += 1;
                }
                None => by_op.push((w[0].0, ms as f64, 1)),
            }
        }
        let last = markers.pop();
        markers.clear();
        markers.extend(last);
        by_op.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(by_op)
    }

    /// A CUDA error of `op` on this GPU.
    pub(crate) fn err(&self, op: &'static str, e: megamoe_cuda::Error) -> Error {
        Error::Cuda {
            op,
            device: Device::Cuda(self.ordinal),
            message: e.to_string(),
        }
    }

    /// With `on`, every matmul (dense, batched, grouped) rounds its operands to bf16 and
    /// runs a bf16 GEMM with f32 accumulation and an f32 result, as mixed-precision
    /// training does (`train.dtype = "bf16"` on a GPU); everything else stays f32. Off by
    /// default: f32 GEMMs without TF32, the parity path.
    pub fn set_bf16_matmul(&self, on: bool) {
        self.bf16_matmul
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether matmuls run in bf16 (see [`CudaBackend::set_bf16_matmul`]).
    pub fn bf16_matmul(&self) -> bool {
        self.bf16_matmul.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// With `on`, the kernels that produce activations or their gradients write bf16
    /// (mixed-precision training, `train.dtype = "bf16"` on a GPU): elementwise ops and
    /// SwiGLU (and their backward), row broadcasts, dense and grouped matmul outputs, the
    /// MoE permute gather, weighted combine and combine row gradients of bf16 rows, RMSNorm and RoPE outputs
    /// and input gradients, the causal-softmax probabilities and their gradient, and the
    /// cross-entropy logit gradient. Their math, every accumulation and reduction stay f32.
    /// f32 outputs are kept where precision matters or the tensor is small: matmuls that
    /// contract over rows (`trans_a`, a weight gradient `dyᵀ·x`), batched matmuls
    /// (attention scores, Muon's Newton-Schulz), reductions, losses, plain and log softmax
    /// (router), top-k, masks, index gathers of f32 tables, the optimizer, and in-place
    /// accumulators (gradients, master weights, moments). Off by default (f32 everywhere,
    /// the parity path). Meant together with [`CudaBackend::set_bf16_matmul`].
    pub fn set_bf16_activations(&self, on: bool) {
        self.bf16_activations
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether activations are written bf16 (see [`CudaBackend::set_bf16_activations`]).
    pub fn bf16_activations(&self) -> bool {
        self.bf16_activations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The dtype of activation outputs: bf16 in bf16-activation mode, else f32.
    pub(crate) fn act(&self) -> DType {
        if self.bf16_activations() {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// `t` itself if its dtype is the activation dtype, else a converted copy (for a
    /// registered f32 weight in bf16 mode: its cached bf16 copy, `weights.rs`).
    pub(crate) fn as_act(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() == self.act() {
            Ok(t.clone())
        } else if self.act() == DType::BF16 {
            self.bf16_operand(t)
        } else {
            crate::backend::HostTransfer::to_dtype(self, t, self.act())
        }
    }

    /// Pool counters of this GPU: (reserved, used, peak) bytes.
    pub fn pool_stats(&self) -> Result<megamoe_cuda::PoolStats> {
        let e = self.engine("pool_stats")?;
        e.gpu
            .pool_stats()
            .map_err(|err| self.err("pool_stats", err))
    }

    /// Starts a new peak window of the pool counters.
    pub fn reset_peak(&self) -> Result<()> {
        let e = self.engine("reset_peak")?;
        e.gpu.reset_peak();
        Ok(())
    }

    /// Waits for every queued kernel (the step boundary of a benchmark).
    pub fn synchronize(&self) -> Result<()> {
        let e = self.engine("synchronize")?;
        e.gpu
            .synchronize()
            .map_err(|err| self.err("synchronize", err))
    }

    /// The device name (e.g. "NVIDIA H200").
    pub fn device_name(&self) -> Result<String> {
        Ok(self.engine("device_name")?.gpu.info().name.clone())
    }

    /// A fresh tensor of `shape` and `dtype` on this GPU (uninitialised) and its address.
    pub(crate) fn empty(&self, e: &Engine, shape: Shape, dtype: DType) -> Result<(Tensor, Dev)> {
        let len = shape.numel();
        let buf = e
            .gpu
            .alloc(len.max(1) * dtype.size_in_bytes())
            .map_err(|err| self.err("alloc", err))?;
        let d = Dev::new(buf.ptr(), kdt(dtype));
        let t = Tensor::from_storage(
            Storage::Cuda(CudaStorage {
                buf,
                dtype,
                len,
                ordinal: self.ordinal,
            }),
            shape,
        )?;
        Ok((t, d))
    }

    /// Maps a megamoe-cuda result of `op` into this crate's error.
    pub(crate) fn ck<T>(&self, op: &'static str, r: megamoe_cuda::Result<T>) -> Result<T> {
        r.map_err(|e| self.err(op, e))
    }
}

/// The kernels' element type of a dtype.
pub(crate) fn kdt(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::Bf16,
        DType::I32 => Dtype::I32,
    }
}

/// The kernels' view of `t`: its storage's address plus its offset, and its dtype. Errors
/// (naming `op`) if `t` is not on a GPU.
pub(crate) fn dev(op: &'static str, t: &Tensor) -> Result<Dev> {
    // Deferred zeros are not there yet (tensor/deferred_zero.rs): writes settle them first.
    t.check_not_deferred(op)?;
    match t.storage() {
        Storage::Cuda(s) => Ok(Dev::new(
            s.ptr() + (t.layout().offset() * t.dtype().size_in_bytes()) as u64,
            kdt(t.dtype()),
        )),
        #[allow(unreachable_patterns)]
        _ => Err(Error::DeviceMismatch {
            op,
            lhs: t.device(),
            rhs: Device::Cuda(0),
        }),
    }
}

/// `t`'s elements as a device view (for megamoe-cuda's `Ops`, which check sizes).
pub(crate) fn view<'a>(op: &'static str, t: &'a Tensor) -> Result<DeviceView<'a>> {
    let d = dev(op, t)?;
    // SAFETY: the address range is `t`'s elements inside its live buffer, and the view
    // borrows `t`, which keeps the buffer alive while the view is used.
    Ok(unsafe { DeviceView::from_raw(d.ptr, t.numel() * t.dtype().size_in_bytes()) })
}
