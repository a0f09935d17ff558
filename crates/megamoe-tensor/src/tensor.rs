//! [`Tensor`]: a cheap-to-clone handle on shared, immutable-by-default storage plus a
//! [`Layout`] (shape and element offset into the buffer).
//!
//! Tensors are always contiguous and row-major from their offset: `reshape` is free, and so
//! is `narrow` wherever the kept block is contiguous (along dimension 0, or any dimension
//! whose outer dimensions are all 1): per-expert slices `[E, N, K] → [1, N, K]`, unpadding
//! and flat-buffer views share the buffer. Other view-like ops (`permute`, `cat`, a narrow
//! of an inner dimension) copy. Contiguity keeps every backend kernel simple and lets the
//! CUDA backend hand `buffer + offset` straight to cuBLAS.
//!
//! Storage sits behind an `Arc` (not `Arc<RwLock>` as candle): ops never mutate their inputs,
//! and the few in-place ops (`add_assign`, `axpy`, `matmul_acc`, ...) write in place only when
//! the handle is unique (`Arc::get_mut`) and otherwise allocate a fresh buffer (copy-on-write), so
//! no lock is ever taken.
//!
//! # Write-through buffers
//! One kind of buffer is shared *and* written: a write-through buffer
//! ([`Tensor::write_through_zeros`], f32) — a model's flat gradient buffer, an optimizer's flat
//! moments. Every view of it ([`Tensor::view`], `reshape`, `narrow` along dim 0) writes in place
//! into the one buffer: an in-place op on a view never copies, and every other handle on the
//! buffer sees the write (a clone is another name for the same elements, not a snapshot; take
//! a [`Tensor::deep_copy`] for one). The aliasing rules:
//! - an in-place op whose input overlaps the written range (same buffer, intersecting
//!   elements) reads a private copy of that input first, so a kernel never reads what it
//!   writes (checked per op, backend-independent);
//! - writes into one buffer come from one thread at a time, and no other thread reads a range
//!   while it is written (the buffer's owner — one trainer, one rank — guarantees it; this is
//!   the `unsafe` contract of [`Tensor::write_through_zeros`]);
//! - in-place ops never change the dtype of a write-through view (a bf16 result would have to
//!   leave the buffer): a non-f32 write-through buffer is refused;
//! - ranges of it can stand for zeros that are not written yet ([`Tensor::defer_zero`]: a
//!   step's gradients), see `deferred_zero.rs`.
//!
//! On the CPU the buffer's elements are reached through a pointer to element 0 taken at
//! creation, and every access builds a slice of exactly the tensor's own range, so writes
//! through one view never overlap a live slice of another, disjoint view. On a device backend
//! a view is `buffer address + offset` already (the CUDA kernels take that address).

use std::borrow::Cow;
use std::sync::Arc;

use half::bf16;

use crate::storage::{CpuStorage, Storage};
use crate::{memory, sync, DType, Device, Error, Result, Shape};

/// Where a tensor's elements sit in its buffer: `shape.numel()` consecutive elements,
/// row-major, starting at element `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    shape: Shape,
    offset: usize,
}

impl Layout {
    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// First element's index in the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The element range `offset .. offset + numel` in the buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.shape.numel()
    }
}

/// A backend buffer owned by one or more tensors. Counts its bytes in the live-bytes
/// counter ([`crate::live_bytes`]) from creation to drop.
#[derive(Debug)]
struct Buffer {
    storage: Storage,
    /// `Some` for a write-through buffer (see the module doc): element 0 of its CPU f32 data
    /// (null on a device), taken while the buffer was still unique.
    write_through: Option<CpuBase>,
    /// A number no other buffer of the process gets (an address can be reused).
    serial: u64,
    /// In-place writes granted on this buffer so far (see [`Tensor::write_stamp`]).
    writes: u64,
    /// Write-through buffers: the element ranges whose zeroing is deferred
    /// ([`Tensor::defer_zero`]), sorted and disjoint.
    deferred: std::sync::Mutex<Vec<std::ops::Range<usize>>>,
}

/// The next [`Buffer`] serial.
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Element 0 of a write-through CPU buffer.
#[derive(Debug, Clone, Copy)]
struct CpuBase(*mut f32);

// SAFETY: the pointer addresses the `Vec<f32>` owned by the same `Buffer` (which moves with
// it and outlives every use); concurrent access is governed by the write-through contract
// (one writing thread at a time, see `Tensor::write_through_zeros`).
unsafe impl Send for CpuBase {}
// SAFETY: as for `Send`.
unsafe impl Sync for CpuBase {}

impl Buffer {
    fn new(storage: Storage) -> Arc<Buffer> {
        memory::on_alloc(storage_bytes(&storage));
        Arc::new(Buffer {
            storage,
            write_through: None,
            serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            writes: 0,
            deferred: std::sync::Mutex::new(Vec::new()),
        })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        memory::on_free(storage_bytes(&self.storage));
    }
}

fn storage_bytes(s: &Storage) -> usize {
    s.len() * s.dtype().size_in_bytes()
}

/// A weak handle on a tensor's buffer: names the buffer while it lives (its identity,
/// [`Tensor::buffer_id`], cannot be reused meanwhile) without keeping its memory. While one
/// is held the buffer is not unique, so in-place ops copy-on-write instead of writing it:
/// a non-write-through buffer keeps its elements for as long as a `BufferRef` on it exists.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub(crate) struct BufferRef(std::sync::Weak<Buffer>);

#[cfg(feature = "cuda")]
impl BufferRef {
    /// True while some tensor still holds the buffer.
    pub(crate) fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// A CPU tensor's elements (its view of the buffer), one variant per dtype.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CpuView<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// i32 elements.
    I32(&'a [i32]),
}

/// Applies a dtype-generic expression to every [`CpuView`] variant, wrapping the result in
/// the matching `CpuStorage` variant: `map_cpu_view!(view, v => kernel(v, ..))`.
macro_rules! map_cpu_view {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            $crate::tensor::CpuView::F32($v) => $crate::storage::CpuStorage::F32($body),
            $crate::tensor::CpuView::BF16($v) => $crate::storage::CpuStorage::BF16($body),
            $crate::tensor::CpuView::I32($v) => $crate::storage::CpuStorage::I32($body),
        }
    };
}
pub(crate) use map_cpu_view;

/// An n-dimensional array on a [`Device`]. Clone is O(1) and shares the buffer.
#[derive(Debug, Clone)]
pub struct Tensor {
    buffer: Arc<Buffer>,
    layout: Layout,
}

fn check_len(op: &'static str, shape: &Shape, got: usize) -> Result<()> {
    if shape.numel() != got {
        return Err(Error::ElementCount {
            op,
            shape: shape.to_vec(),
            expected: shape.numel(),
            got,
        });
    }
    Ok(())
}

impl Tensor {
    // ---------------------------------------------------------------- constructors

    /// A tensor owning `storage` (a backend's fresh buffer) with `shape`, offset 0. For
    /// backends: the buffer must hold exactly `shape.numel()` elements.
    pub fn from_storage(storage: Storage, shape: Shape) -> Result<Tensor> {
        check_len("from_storage", &shape, storage.len())?;
        Ok(Tensor {
            buffer: Buffer::new(storage),
            layout: Layout { shape, offset: 0 },
        })
    }

    /// This handle's storage and layout when it is the buffer's only owner and the buffer
    /// is not write-through (for activation offload); `self` becomes an empty CPU tensor
    /// of shape `[0]`. `None` (unchanged) otherwise.
    #[cfg(feature = "cuda")]
    pub(crate) fn take_unique_storage(&mut self) -> Option<(Storage, Layout)> {
        let buf = Arc::get_mut(&mut self.buffer)?;
        if buf.write_through.is_some() {
            return None;
        }
        let empty = Storage::Cpu(crate::CpuStorage::F32(Vec::new()));
        let storage = std::mem::replace(&mut buf.storage, empty);
        memory::on_free(storage_bytes(&storage));
        let layout = std::mem::replace(
            &mut self.layout,
            Layout {
                shape: Shape::from(vec![0]),
                offset: 0,
            },
        );
        Some((storage, layout))
    }

    /// A tensor over `storage` with `layout` (the inverse of `take_unique_storage`).
    #[cfg(feature = "cuda")]
    pub(crate) fn from_storage_layout(storage: Storage, layout: Layout) -> Tensor {
        Tensor {
            buffer: Buffer::new(storage),
            layout,
        }
    }

    /// A zeroed f32 tensor of `shape` on `device` whose buffer is *write-through*: every view
    /// of it ([`Tensor::view`], `reshape`, a dim-0 `narrow`) is written in place by in-place
    /// ops, and every handle on the buffer sees the writes (see the module doc). The flat
    /// gradient buffer of a model and the flat optimizer moments are such buffers; their
    /// per-parameter tensors are views at the flat layout's offsets.
    ///
    /// # Safety
    /// Writes into the buffer (through any of its views) must come from one thread at a
    /// time, and no thread may read a range of it while another thread writes that range.
    /// (Within one op the aliasing of inputs and output is handled: see the module doc.)
    pub unsafe fn write_through_zeros(shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let mut t = Tensor::zeros(shape, DType::F32, device)?;
        let buffer = Arc::get_mut(&mut t.buffer).ok_or(Error::InvalidArgument {
            op: "write_through_zeros",
            arg: "buffer",
            value: "shared".into(),
            rule: "a fresh buffer is unique",
        })?;
        let base = match &mut buffer.storage {
            Storage::Cpu(CpuStorage::F32(v)) => v.as_mut_ptr(),
            Storage::Cpu(_) => {
                return Err(Error::DTypeMismatch {
                    op: "write_through_zeros",
                    arg: "buffer",
                    expected: "f32",
                    got: buffer.storage.dtype(),
                })
            }
            #[allow(unreachable_patterns)]
            _ => std::ptr::null_mut(),
        };
        buffer.write_through = Some(CpuBase(base));
        Ok(t)
    }

    /// True if this tensor views a write-through buffer ([`Tensor::write_through_zeros`]).
    pub fn is_write_through(&self) -> bool {
        self.buffer.write_through.is_some()
    }

    /// An identity of this tensor's buffer, equal for every handle on it while it lives.
    #[cfg(feature = "cuda")]
    pub(crate) fn buffer_id(&self) -> usize {
        Arc::as_ptr(&self.buffer) as usize
    }

    /// The buffer's identity and count of in-place writes: equal stamps mean the same
    /// buffer with the same elements (every in-place write through a [`Tensor`] counts,
    /// write-through views aside; kernels that write by address count nothing, see
    /// [`Tensor::claim_f32_in_place`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn write_stamp(&self) -> (u64, u64) {
        (self.buffer.serial, self.buffer.writes)
    }

    /// A weak handle on this tensor's buffer (see [`BufferRef`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn buffer_ref(&self) -> BufferRef {
        BufferRef(Arc::downgrade(&self.buffer))
    }

    /// Handles (strong and weak) on this tensor's buffer.
    #[cfg(feature = "cuda")]
    pub(crate) fn handle_count(&self) -> usize {
        Arc::strong_count(&self.buffer) + Arc::weak_count(&self.buffer)
    }

    /// True if `self` and `other` view intersecting elements of one buffer.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        let (a, b) = (self.layout.range(), other.layout.range());
        self.same_storage(other)
            && !a.is_empty()
            && !b.is_empty()
            && a.start < b.end
            && b.start < a.end
    }

    /// For in-place ops: `input` itself, or a private copy of it when `self` (the written
    /// tensor) is a write-through view overlapping it, so that a kernel never reads the
    /// elements it writes (copy-on-write buffers are copied by the write instead).
    pub(crate) fn unaliased<'a>(&self, input: &'a Tensor) -> Result<Cow<'a, Tensor>> {
        if self.is_write_through() && self.overlaps(input) {
            Ok(Cow::Owned(input.deep_copy()?))
        } else {
            Ok(Cow::Borrowed(input))
        }
    }

    /// Wraps CPU storage. Internal: the caller guarantees `storage.len() == shape.numel()`.
    pub(crate) fn from_cpu(storage: CpuStorage, shape: Shape) -> Tensor {
        debug_assert_eq!(
            storage.len(),
            shape.numel(),
            "backend produced a wrong-sized buffer"
        );
        Tensor {
            buffer: Buffer::new(Storage::Cpu(storage)),
            layout: Layout { shape, offset: 0 },
        }
    }

    /// Internal: an f32 CPU tensor from a buffer of the right size.
    pub(crate) fn cpu_f32_from(data: Vec<f32>, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_cpu(CpuStorage::F32(data), shape.into())
    }

    /// Internal: an i32 CPU tensor from a buffer of the right size.
    pub(crate) fn cpu_i32_from(data: Vec<i32>, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_cpu(CpuStorage::I32(data), shape.into())
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(shape, 0.0, dtype, device)
    }

    /// A tensor of ones.
    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(shape, 1.0, dtype, device)
    }

    /// A tensor with every element `value`. For `I32`, `value` must be an integer in i32 range.
    pub fn full(
        shape: impl Into<Shape>,
        value: f32,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let backend = crate::backend::backend_for(device)?;
        if dtype == DType::I32 && (value.fract() != 0.0 || value.abs() > i32::MAX as f32) {
            return Err(Error::InvalidArgument {
                op: "full",
                arg: "value",
                value: value.to_string(),
                rule: "an I32 tensor needs an integer value in i32 range",
            });
        }
        backend.full(shape.into(), value, dtype)
    }

    /// A rank-0 f32 tensor holding `value` (a fill on the device: no host copy, so a GPU
    /// does not wait for its queue).
    pub fn scalar(value: f32, device: Device) -> Result<Tensor> {
        Tensor::full(Shape::from(Vec::new()), value, DType::F32, device)
    }

    /// An f32 tensor owning `data` (row-major). Errors if `data.len() != shape.numel()`.
    pub fn from_vec_f32(data: Vec<f32>, shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let backend = crate::backend::backend_for(device)?;
        let shape = shape.into();
        check_len("from_vec_f32", &shape, data.len())?;
        backend.upload(CpuStorage::F32(data), shape)
    }

    /// An f32 tensor copied from `data`.
    pub fn from_slice(data: &[f32], shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        Tensor::from_vec_f32(data.to_vec(), shape, device)
    }

    /// A bf16 tensor owning `data`.
    pub fn from_vec_bf16(
        data: Vec<bf16>,
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Tensor> {
        let backend = crate::backend::backend_for(device)?;
        let shape = shape.into();
        check_len("from_vec_bf16", &shape, data.len())?;
        backend.upload(CpuStorage::BF16(data), shape)
    }

    /// An i32 (index) tensor owning `data`.
    pub fn from_vec_i32(data: Vec<i32>, shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let backend = crate::backend::backend_for(device)?;
        let shape = shape.into();
        check_len("from_vec_i32", &shape, data.len())?;
        backend.upload(CpuStorage::I32(data), shape)
    }

    /// An i32 tensor holding `data` that depends only on shapes (group offsets, the sizes of
    /// groups known on the host), for reading: a GPU keeps one device copy per content and
    /// shape, made on first use, and hands out shared handles, so later calls (and the
    /// replays of a captured step) copy nothing from the host. An in-place write to the
    /// result copies it first (its buffer is shared). Errors as [`Tensor::from_vec_i32`].
    pub fn constant_i32(data: Vec<i32>, shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let backend = crate::backend::backend_for(device)?;
        let shape = shape.into();
        check_len("constant_i32", &shape, data.len())?;
        backend.constant_i32(data, shape)
    }

    /// `[0, 1, ..., n-1]` as an i32 tensor of shape `[n]`.
    pub fn arange_i32(n: usize, device: Device) -> Result<Tensor> {
        if n > i32::MAX as usize {
            return Err(Error::InvalidArgument {
                op: "arange_i32",
                arg: "n",
                value: n.to_string(),
                rule: "must fit in i32",
            });
        }
        Tensor::from_vec_i32((0..n as i32).collect(), [n], device)
    }

    // ---------------------------------------------------------------- metadata

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.layout.shape
    }

    /// Shape and offset of this tensor's elements in its buffer.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Dimension sizes.
    pub fn dims(&self) -> &[usize] {
        self.layout.shape.dims()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.layout.shape.rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.shape.numel()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.buffer.storage.dtype()
    }

    /// Device of the storage.
    pub fn device(&self) -> Device {
        self.buffer.storage.device()
    }

    /// The whole backend buffer this tensor views (for backend code, together with
    /// [`Tensor::layout`]; layers use ops).
    pub fn storage(&self) -> &Storage {
        &self.buffer.storage
    }

    /// True if both handles share one buffer (possibly different parts of it).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }

    /// A view of `numel(shape)` elements starting `offset` elements into this tensor, with
    /// `shape`; shares the buffer (no copy). Errors if the range leaves this tensor.
    pub fn view(&self, offset: usize, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if offset
            .checked_add(shape.numel())
            .is_none_or(|end| end > self.numel())
        {
            return Err(Error::InvalidArgument {
                op: "view",
                arg: "offset+numel(shape)",
                value: format!("{offset}+{}", shape.numel()),
                rule: "must be <= the tensor's element count",
            });
        }
        Ok(Tensor {
            buffer: self.buffer.clone(),
            layout: Layout {
                shape,
                offset: self.layout.offset + offset,
            },
        })
    }

    /// One view of shape `shape` over `parts` when they are consecutive element ranges of
    /// one buffer, in order (`parts[i + 1]` starts where `parts[i]` ends) and `shape` holds
    /// exactly their elements; `None` otherwise (the caller then copies). No copy: e.g.
    /// two parameters' gradients laid out one after the other in a flat buffer, written
    /// as one `[2F, H]` operand.
    pub fn joined(parts: &[&Tensor], shape: impl Into<Shape>) -> Option<Tensor> {
        let shape = shape.into();
        let first = parts.first()?;
        let mut end = first.layout.offset;
        for p in parts {
            if !p.same_storage(first) || p.layout.offset != end {
                return None;
            }
            end += p.numel();
        }
        (shape.numel() == end - first.layout.offset).then(|| Tensor {
            buffer: first.buffer.clone(),
            layout: Layout {
                shape,
                offset: first.layout.offset,
            },
        })
    }

    /// Size of dimension `dim`.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        self.shape().dim("dim", dim)
    }

    /// The two dimensions of a rank-2 tensor.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.dims() {
            &[a, b] => Ok((a, b)),
            _ => Err(self.rank_error("dims2", "self", 2)),
        }
    }

    /// The three dimensions of a rank-3 tensor.
    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        match self.dims() {
            &[a, b, c] => Ok((a, b, c)),
            _ => Err(self.rank_error("dims3", "self", 3)),
        }
    }

    /// The four dimensions of a rank-4 tensor.
    pub fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        match self.dims() {
            &[a, b, c, d] => Ok((a, b, c, d)),
            _ => Err(self.rank_error("dims4", "self", 4)),
        }
    }

    /// A `RankMismatch` error for this tensor.
    pub(crate) fn rank_error(&self, op: &'static str, arg: &'static str, expected: usize) -> Error {
        Error::RankMismatch {
            op,
            arg,
            expected,
            got: self.dims().to_vec(),
        }
    }

    /// Checks rank `expected`, naming `op` and `arg` on failure.
    pub(crate) fn expect_rank(
        &self,
        op: &'static str,
        arg: &'static str,
        expected: usize,
    ) -> Result<()> {
        if self.rank() != expected {
            return Err(self.rank_error(op, arg, expected));
        }
        Ok(())
    }

    /// Same buffer, new shape with the same element count. Copies nothing.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        check_len("reshape", &shape, self.numel())?;
        Ok(Tensor {
            buffer: self.buffer.clone(),
            layout: Layout {
                shape,
                offset: self.layout.offset,
            },
        })
    }

    // ---------------------------------------------------------------- conversions

    /// Converts to `dtype` (f32↔bf16 rounds to nearest even; float→i32 truncates toward
    /// zero; i32→float is exact up to 2^24). Same dtype returns a shared handle.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        self.backend().to_dtype(self, dtype)
    }

    /// Copies to `device` (same device: shared handle). Through host memory; leaving a
    /// device is a host read (SYNC, counted).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        device.check_available()?;
        if device == self.device() {
            return Ok(self.clone());
        }
        let target = crate::backend::backend_for(device)?;
        if self.device() != Device::Cpu {
            sync::record_host_read();
        }
        let data = self.backend().to_host(self)?;
        target.upload(data, self.shape().clone())
    }

    /// A deep copy with its own buffer (of just this tensor's elements).
    pub fn deep_copy(&self) -> Result<Tensor> {
        self.backend().copy(self)
    }

    /// Element values as f32 on the host (bf16 widened). Errors for `I32`.
    ///
    /// SYNC: blocks until the device is done, and counts one host read ([`crate::host_reads`]).
    /// The host-read methods are the only ways a layer may read element values; keep them
    /// out of hot paths or name the sync point.
    pub fn to_host_f32(&self) -> Result<Vec<f32>> {
        sync::record_host_read();
        self.host_f32("to_host_f32")
    }

    /// Element values of several tensors as f32 on the host, in one read: float tensors as
    /// by [`Tensor::to_host_f32`], `I32` tensors converted exactly (|v| ≤ 2^24). One host
    /// read however many tensors (a device backend gathers them into one buffer first): the
    /// way to read a step's metrics.
    ///
    /// SYNC: blocks until the device is done; counts one host read.
    pub fn to_host_batch_f32(tensors: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
        sync::record_host_read();
        tensors
            .iter()
            .map(|t| match t.backend().to_host(t)? {
                CpuStorage::F32(v) => Ok(v),
                CpuStorage::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
                CpuStorage::I32(v) => Ok(v.iter().map(|&x| x as f32).collect()),
            })
            .collect()
    }

    /// Element values as i32 on the host. Errors unless the dtype is `I32`.
    ///
    /// SYNC: blocks until the device is done; counts one host read.
    pub fn to_host_i32(&self) -> Result<Vec<i32>> {
        sync::record_host_read();
        match self.backend().to_host(self)? {
            CpuStorage::I32(v) => Ok(v),
            _ => Err(Error::DTypeMismatch {
                op: "to_host_i32",
                arg: "self",
                expected: "i32",
                got: self.dtype(),
            }),
        }
    }

    /// Element values as bf16 on the host. Errors unless the dtype is `BF16`.
    ///
    /// SYNC: blocks until the device is done; counts one host read.
    pub fn to_host_bf16(&self) -> Result<Vec<bf16>> {
        sync::record_host_read();
        match self.backend().to_host(self)? {
            CpuStorage::BF16(v) => Ok(v),
            _ => Err(Error::DTypeMismatch {
                op: "to_host_bf16",
                arg: "self",
                expected: "bf16",
                got: self.dtype(),
            }),
        }
    }

    /// The single value of a one-element float tensor.
    ///
    /// SYNC: blocks until the device is done; counts one host read.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::ElementCount {
                op: "to_scalar_f32",
                shape: self.dims().to_vec(),
                expected: 1,
                got: self.numel(),
            });
        }
        sync::record_host_read();
        Ok(self.host_f32("to_scalar_f32")?[0])
    }

    /// Float elements on the host (bf16 widened), not counted: the host-read methods count.
    fn host_f32(&self, op: &'static str) -> Result<Vec<f32>> {
        match self.backend().to_host(self)? {
            CpuStorage::F32(v) => Ok(v),
            CpuStorage::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            CpuStorage::I32(_) => Err(Error::DTypeMismatch {
                op,
                arg: "self",
                expected: "f32 or bf16",
                got: DType::I32,
            }),
        }
    }

    // ---------------------------------------------------------------- backend access

    /// This tensor's elements on the CPU backend. Backend use only: errors (naming `op`) if
    /// the storage is not on the CPU, never copies across devices.
    pub(crate) fn cpu_view(&self, op: &'static str) -> Result<CpuView<'_>> {
        let r = self.layout.range();
        if let (Some(CpuBase(base)), Storage::Cpu(CpuStorage::F32(v))) =
            (self.buffer.write_through, &self.buffer.storage)
        {
            self.check_not_deferred(op)?;
            debug_assert!(r.end <= v.len());
            // SAFETY: `r` lies inside the buffer (checked when the view was made) and `base`
            // is its element 0; only this range is borrowed, so in-place writes through
            // other, disjoint views of the buffer do not alias it (module doc).
            return Ok(CpuView::F32(unsafe {
                std::slice::from_raw_parts(base.add(r.start), r.len())
            }));
        }
        match &self.buffer.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(CpuView::F32(&v[r])),
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(CpuView::BF16(&v[r])),
            Storage::Cpu(CpuStorage::I32(v)) => Ok(CpuView::I32(&v[r])),
            #[allow(unreachable_patterns)]
            _ => Err(Error::NotOnCpu {
                op,
                device: self.device(),
            }),
        }
    }

    /// CPU f32 view of a float tensor (bf16 widened into a fresh buffer). Backend use only;
    /// errors on non-CPU storage.
    pub(crate) fn cpu_f32(&self, op: &'static str, arg: &'static str) -> Result<Cow<'_, [f32]>> {
        match self.cpu_view(op)? {
            CpuView::F32(v) => Ok(Cow::Borrowed(v)),
            CpuView::BF16(v) => Ok(Cow::Owned(crate::cpu::par_map(v, |x| x.to_f32()))),
            CpuView::I32(_) => Err(Error::DTypeMismatch {
                op,
                arg,
                expected: "f32 or bf16",
                got: DType::I32,
            }),
        }
    }

    /// CPU i32 view of an index tensor. Backend use only; errors on non-CPU storage.
    pub(crate) fn cpu_i32(&self, op: &'static str, arg: &'static str) -> Result<&[i32]> {
        match self.cpu_view(op)? {
            CpuView::I32(v) => Ok(v),
            _ => Err(Error::DTypeMismatch {
                op,
                arg,
                expected: "i32",
                got: self.dtype(),
            }),
        }
    }

    /// Mutable f32 elements, unique to this handle: in place if the buffer is unshared, f32
    /// and exactly this tensor's elements, else a fresh f32 copy of the elements replaces
    /// the handle's buffer (copy-on-write). A write-through view is written in place, in the
    /// shared buffer (module doc). Errors on non-CPU storage.
    pub(crate) fn cpu_f32_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        if let Some(CpuBase(base)) = self.buffer.write_through {
            // A write may read the old elements: deferred zeros become real ones first.
            self.settle_deferred()?;
            let r = self.layout.range();
            return match &self.buffer.storage {
                Storage::Cpu(CpuStorage::F32(v)) => {
                    debug_assert!(r.end <= v.len());
                    // SAFETY: `r` lies inside the buffer and `base` is its element 0. The
                    // slice covers only this view's range and lives while `self` is borrowed
                    // mutably; overlapping inputs of the same op were copied
                    // (`Tensor::unaliased`) and other threads stay out (the contract of
                    // `write_through_zeros`).
                    Ok(unsafe { std::slice::from_raw_parts_mut(base.add(r.start), r.len()) })
                }
                _ => Err(Error::NotOnCpu {
                    op,
                    device: self.device(),
                }),
            };
        }
        self.cpu_unique_mut(
            |s| match s {
                Storage::Cpu(CpuStorage::F32(v)) => Some(v),
                _ => None,
            },
            |t| Ok(t.cpu_f32(op, "self")?.into_owned()),
            CpuStorage::F32,
        )
    }

    /// The copy-on-write part of [`Tensor::cpu_f32_mut`] and `cpu_bf16_mut`: the elements
    /// in place where the buffer is unshared, of `slot`'s kind and exactly this tensor's
    /// elements, else `copy(self)` wrapped by `wrap` replaces the handle's buffer; counted
    /// as a write.
    pub(crate) fn cpu_unique_mut<T>(
        &mut self,
        slot: fn(&mut Storage) -> Option<&mut Vec<T>>,
        copy: impl FnOnce(&Tensor) -> Result<Vec<T>>,
        wrap: fn(Vec<T>) -> CpuStorage,
    ) -> Result<&mut [T]> {
        let n = self.numel();
        let in_place = self.layout.offset == 0
            && Arc::get_mut(&mut self.buffer)
                .is_some_and(|b| slot(&mut b.storage).is_some_and(|v| v.len() == n));
        if !in_place {
            let elems = copy(self)?;
            self.buffer = Buffer::new(Storage::Cpu(wrap(elems)));
            self.layout.offset = 0;
        }
        let Some(Buffer {
            storage, writes, ..
        }) = Arc::get_mut(&mut self.buffer)
        else {
            unreachable!("buffer was just made unique")
        };
        *writes += 1;
        Ok(slot(storage)
            .expect("buffer was just made of slot's kind")
            .as_mut_slice())
    }

    /// For in-place kernels of a device backend: makes this handle the unique owner of an
    /// f32 buffer holding exactly its elements from offset 0, replacing it with `fresh(self)`
    /// (a new f32 copy) when the buffer is shared, offset, larger or not f32 (copy-on-write).
    /// A write-through view stays where it is (the kernel writes `buffer + offset`).
    #[cfg(feature = "cuda")]
    pub(crate) fn make_unique_f32(
        &mut self,
        fresh: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if self.is_write_through() {
            // Written where it is: `buffer + offset` (module doc); always f32. A write may
            // read the old elements: deferred zeros become real ones first.
            return self.settle_deferred();
        }
        self.make_unique_as(DType::F32, fresh)
    }

    /// [`Tensor::make_unique_f32`] for a kernel that will write the buffer by address later
    /// and keeps what depends on its elements up to date itself (the flat AdamW step, which
    /// writes the weight's bf16 copy with it): the write is not counted in
    /// [`Tensor::write_stamp`].
    #[cfg(feature = "cuda")]
    pub(crate) fn claim_f32_in_place(
        &mut self,
        fresh: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if self.is_write_through() {
            return self.settle_deferred();
        }
        self.unique_as(DType::F32, fresh, false)
    }

    /// [`Tensor::make_unique_f32`] for a buffer of `dtype` (write-through views aside): `self`
    /// is replaced by `fresh(self)` (which must return a `dtype` tensor of the same shape)
    /// unless it already is a unique, whole, offset-0 `dtype` buffer.
    #[cfg(feature = "cuda")]
    pub(crate) fn make_unique_as(
        &mut self,
        dtype: DType,
        fresh: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        self.unique_as(dtype, fresh, true)
    }

    #[cfg(feature = "cuda")]
    fn unique_as(
        &mut self,
        dtype: DType,
        fresh: impl FnOnce(&Tensor) -> Result<Tensor>,
        count: bool,
    ) -> Result<()> {
        let n = self.numel();
        let unique = self.layout.offset == 0
            && self.dtype() == dtype
            && Arc::get_mut(&mut self.buffer).is_some_and(|b| b.storage.len() == n);
        if !unique {
            *self = fresh(self)?;
        }
        if count {
            if let Some(b) = Arc::get_mut(&mut self.buffer) {
                b.writes += 1;
            }
        }
        Ok(())
    }

    /// Checks that `other` lives on the same device as `self`.
    pub(crate) fn same_device(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.device() != other.device() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: self.device(),
                rhs: other.device(),
            });
        }
        Ok(())
    }

    /// Checks `self` and `other` have identical shapes.
    pub(crate) fn same_shape(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.dims() != other.dims() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: self.dims().to_vec(),
                rhs: other.dims().to_vec(),
                rule: "shapes must be equal",
            });
        }
        self.same_device(op, other)
    }
}

#[path = "deferred_zero.rs"]
mod deferred_zero;
#[path = "moment_access.rs"]
mod moment_access;
pub use deferred_zero::READ_DEFERRED;

#[cfg(test)]
#[path = "tensor_stamp_tests.rs"]
mod write_stamp_tests;
