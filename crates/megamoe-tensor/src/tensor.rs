//! [`Tensor`]: a cheap-to-clone handle on shared, immutable-by-default storage plus a shape.
//!
//! Tensors are always contiguous and row-major: `reshape` is free, every other view-like op
//! (`narrow`, `permute`, `cat`, ...) copies. Contiguity keeps every backend kernel simple and
//! lets the CUDA backend hand buffers straight to cuBLAS; the copies it costs are cheap next
//! to the GEMMs of an MoE step.
//!
//! Storage sits behind an `Arc` (not `Arc<RwLock>` as candle): ops never mutate their inputs,
//! and the few in-place ops (`add_assign`, `axpy`, `matmul_acc`) write in place only when the
//! handle is unique (`Arc::get_mut`) and otherwise allocate a fresh buffer (copy-on-write), so
//! no lock is ever taken.

use std::borrow::Cow;
use std::sync::Arc;

use half::bf16;

use crate::storage::{CpuStorage, Storage};
use crate::{DType, Device, Error, Result, Shape};

/// An n-dimensional array on a [`Device`]. Clone is O(1) and shares the buffer.
#[derive(Debug, Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Shape,
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

    /// Wraps CPU storage. Internal: the caller guarantees `storage.len() == shape.numel()`.
    pub(crate) fn from_cpu(storage: CpuStorage, shape: Shape) -> Tensor {
        debug_assert_eq!(
            storage.len(),
            shape.numel(),
            "backend produced a wrong-sized buffer"
        );
        Tensor {
            storage: Arc::new(Storage::Cpu(storage)),
            shape,
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
        device.check_available()?;
        let shape = shape.into();
        let n = shape.numel();
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(vec![value; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f32(value); n]),
            DType::I32 => {
                if value.fract() != 0.0 || value.abs() > i32::MAX as f32 {
                    return Err(Error::InvalidArgument {
                        op: "full",
                        arg: "value",
                        value: value.to_string(),
                        rule: "an I32 tensor needs an integer value in i32 range",
                    });
                }
                CpuStorage::I32(vec![value as i32; n])
            }
        };
        Ok(Tensor::from_cpu(storage, shape))
    }

    /// A rank-0 f32 tensor holding `value`.
    pub fn scalar(value: f32, device: Device) -> Result<Tensor> {
        Tensor::from_vec_f32(vec![value], Shape::from(Vec::new()), device)
    }

    /// An f32 tensor owning `data` (row-major). Errors if `data.len() != shape.numel()`.
    pub fn from_vec_f32(data: Vec<f32>, shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        device.check_available()?;
        let shape = shape.into();
        check_len("from_vec_f32", &shape, data.len())?;
        Ok(Tensor::from_cpu(CpuStorage::F32(data), shape))
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
        device.check_available()?;
        let shape = shape.into();
        check_len("from_vec_bf16", &shape, data.len())?;
        Ok(Tensor::from_cpu(CpuStorage::BF16(data), shape))
    }

    /// An i32 (index) tensor owning `data`.
    pub fn from_vec_i32(data: Vec<i32>, shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        device.check_available()?;
        let shape = shape.into();
        check_len("from_vec_i32", &shape, data.len())?;
        Ok(Tensor::from_cpu(CpuStorage::I32(data), shape))
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
        &self.shape
    }

    /// Dimension sizes.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// Device of the storage.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// The backend storage (for backend code; layers use ops).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// True if both handles share one buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// Size of dimension `dim`.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        self.shape.dim("dim", dim)
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
            storage: self.storage.clone(),
            shape,
        })
    }

    // ---------------------------------------------------------------- conversions

    /// Converts to `dtype` (f32↔bf16 rounds to nearest even; float→i32 truncates toward
    /// zero; i32→float is exact up to 2^24). Same dtype returns a shared handle.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let Storage::Cpu(s) = &*self.storage;
        let out = match (s, dtype) {
            (CpuStorage::F32(v), DType::BF16) => {
                CpuStorage::BF16(crate::cpu::par_map(v, |x| bf16::from_f32(*x)))
            }
            (CpuStorage::BF16(v), DType::F32) => {
                CpuStorage::F32(crate::cpu::par_map(v, |x| x.to_f32()))
            }
            (CpuStorage::I32(v), DType::F32) => {
                CpuStorage::F32(crate::cpu::par_map(v, |x| *x as f32))
            }
            (CpuStorage::I32(v), DType::BF16) => {
                CpuStorage::BF16(crate::cpu::par_map(v, |x| bf16::from_f32(*x as f32)))
            }
            (CpuStorage::F32(v), DType::I32) => {
                CpuStorage::I32(crate::cpu::par_map(v, |x| *x as i32))
            }
            (CpuStorage::BF16(v), DType::I32) => {
                CpuStorage::I32(crate::cpu::par_map(v, |x| x.to_f32() as i32))
            }
            (CpuStorage::F32(_), DType::F32)
            | (CpuStorage::BF16(_), DType::BF16)
            | (CpuStorage::I32(_), DType::I32) => unreachable!("same dtype returned above"),
        };
        Ok(Tensor::from_cpu(out, self.shape.clone()))
    }

    /// Copies to `device` (same device: shared handle).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        device.check_available()?;
        if device == self.device() {
            return Ok(self.clone());
        }
        Err(Error::DeviceNotAvailable {
            device,
            reason: "no cross-device copy in this build",
        })
    }

    /// A deep copy with its own buffer.
    pub fn deep_copy(&self) -> Result<Tensor> {
        let Storage::Cpu(s) = &*self.storage;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(v.clone()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v.clone()),
            CpuStorage::I32(v) => CpuStorage::I32(v.clone()),
        };
        Ok(Tensor::from_cpu(out, self.shape.clone()))
    }

    /// Element values as f32 on the host (bf16 widened). Errors for `I32`.
    ///
    /// SYNC: blocks until the device is done. This and [`Tensor::to_host_i32`] are the only
    /// ways a layer may read element values; keep them out of hot paths or name the sync point.
    pub fn to_host_f32(&self) -> Result<Vec<f32>> {
        Ok(self.cpu_f32("to_host_f32", "self")?.into_owned())
    }

    /// Element values as i32 on the host. Errors unless the dtype is `I32`.
    ///
    /// SYNC: blocks until the device is done.
    pub fn to_host_i32(&self) -> Result<Vec<i32>> {
        Ok(self.cpu_i32("to_host_i32", "self")?.to_vec())
    }

    /// Element values as bf16 on the host. Errors unless the dtype is `BF16`.
    ///
    /// SYNC: blocks until the device is done.
    pub fn to_host_bf16(&self) -> Result<Vec<bf16>> {
        let Storage::Cpu(s) = &*self.storage;
        match s {
            CpuStorage::BF16(v) => Ok(v.clone()),
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
    /// SYNC: blocks until the device is done.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::ElementCount {
                op: "to_scalar_f32",
                shape: self.dims().to_vec(),
                expected: 1,
                got: self.numel(),
            });
        }
        Ok(self.cpu_f32("to_scalar_f32", "self")?[0])
    }

    // ---------------------------------------------------------------- backend access

    /// CPU f32 view of a float tensor (bf16 widened into a fresh buffer). Backend use only.
    pub(crate) fn cpu_f32(&self, op: &'static str, arg: &'static str) -> Result<Cow<'_, [f32]>> {
        let Storage::Cpu(s) = &*self.storage;
        match s {
            CpuStorage::F32(v) => Ok(Cow::Borrowed(v.as_slice())),
            CpuStorage::BF16(v) => Ok(Cow::Owned(crate::cpu::par_map(v, |x| x.to_f32()))),
            CpuStorage::I32(_) => Err(Error::DTypeMismatch {
                op,
                arg,
                expected: "f32 or bf16",
                got: DType::I32,
            }),
        }
    }

    /// CPU i32 view of an index tensor. Backend use only.
    pub(crate) fn cpu_i32(&self, op: &'static str, arg: &'static str) -> Result<&[i32]> {
        let Storage::Cpu(s) = &*self.storage;
        match s {
            CpuStorage::I32(v) => Ok(v.as_slice()),
            _ => Err(Error::DTypeMismatch {
                op,
                arg,
                expected: "i32",
                got: self.dtype(),
            }),
        }
    }

    /// Mutable f32 buffer, unique to this handle: in place if the storage is unshared and
    /// f32, else a fresh f32 copy replaces the handle's storage (copy-on-write).
    pub(crate) fn cpu_f32_mut(&mut self, op: &'static str) -> Result<&mut Vec<f32>> {
        let unique_f32 = matches!(
            Arc::get_mut(&mut self.storage),
            Some(Storage::Cpu(CpuStorage::F32(_)))
        );
        if !unique_f32 {
            let copy = self.cpu_f32(op, "self")?.into_owned();
            self.storage = Arc::new(Storage::Cpu(CpuStorage::F32(copy)));
        }
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(CpuStorage::F32(v))) => Ok(v),
            _ => unreachable!("storage was just made a unique f32 buffer"),
        }
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
