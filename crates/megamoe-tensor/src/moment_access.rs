//! Mutable access to a bf16 CPU tensor's elements, for in-place kernels whose state is kept
//! in bf16 (AdamW's moments under `optim.moment_dtype = "bf16"`). The f32 counterpart is
//! [`Tensor::cpu_f32_mut`].

use half::bf16;

use super::Tensor;
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Error, Result};

impl Tensor {
    /// Mutable bf16 elements, unique to this handle: in place if the buffer is unshared,
    /// bf16 and exactly this tensor's elements, else a fresh bf16 copy of the elements
    /// replaces the handle's buffer (copy-on-write). Errors on a tensor that is not bf16 (no
    /// silent conversion) or not on the CPU. Write-through buffers are f32 only, so none is
    /// met here.
    pub(crate) fn cpu_bf16_mut(&mut self, op: &'static str) -> Result<&mut [bf16]> {
        if self.dtype() != DType::BF16 {
            return Err(Error::DTypeMismatch {
                op,
                arg: "self",
                expected: "bf16",
                got: self.dtype(),
            });
        }
        self.cpu_unique_mut(
            |s| match s {
                Storage::Cpu(CpuStorage::BF16(v)) => Some(v),
                _ => None,
            },
            |t| match &t.buffer.storage {
                Storage::Cpu(CpuStorage::BF16(v)) => Ok(v[t.layout.range()].to_vec()),
                _ => Err(Error::NotOnCpu {
                    op,
                    device: t.device(),
                }),
            },
            CpuStorage::BF16,
        )
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    /// [`Tensor::claim_f32_in_place`] for a buffer of `dtype`: a write-through view (f32)
    /// stays where it is; anything else must be (or is replaced by `fresh(self)` as) a
    /// unique, whole, offset-0 `dtype` buffer. Not counted as a write (the kernel that
    /// writes it by address comes later).
    pub(crate) fn claim_in_place(
        &mut self,
        dtype: DType,
        fresh: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if dtype == DType::F32 {
            return self.claim_f32_in_place(fresh);
        }
        self.unique_as(dtype, fresh, false)
    }

    /// [`Tensor::make_unique_f32`] for a buffer of `dtype` (counted as a write): f32 goes
    /// through `make_unique_f32` (write-through views stay), any other dtype through
    /// `make_unique_as`.
    pub(crate) fn make_unique_as_or_write_through(
        &mut self,
        dtype: DType,
        fresh: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if dtype == DType::F32 {
            return self.make_unique_f32(fresh);
        }
        self.make_unique_as(dtype, fresh)
    }
}
