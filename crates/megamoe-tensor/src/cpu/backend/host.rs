//! [`HostTransfer`] on the CPU: host data is the storage itself.

use half::bf16;

use crate::backend::{CpuBackend, HostTransfer};
use crate::storage::CpuStorage;
use crate::tensor::{map_cpu_view, CpuView};
use crate::{DType, Result, Shape, Tensor};

impl HostTransfer for CpuBackend {
    fn upload(&self, data: CpuStorage, shape: Shape) -> Result<Tensor> {
        Ok(Tensor::from_cpu(data, shape))
    }

    fn to_host(&self, x: &Tensor) -> Result<CpuStorage> {
        Ok(map_cpu_view!(x.cpu_view("to_host")?, v => v.to_vec()))
    }

    fn full(&self, shape: Shape, value: f32, dtype: DType) -> Result<Tensor> {
        let n = shape.numel();
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(vec![value; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f32(value); n]),
            DType::I32 => CpuStorage::I32(vec![value as i32; n]),
        };
        Ok(Tensor::from_cpu(storage, shape))
    }

    fn to_dtype(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let out = match (x.cpu_view("to_dtype")?, dtype) {
            (CpuView::F32(v), DType::BF16) => {
                CpuStorage::BF16(crate::cpu::par_map(v, |x| bf16::from_f32(*x)))
            }
            (CpuView::BF16(v), DType::F32) => {
                CpuStorage::F32(crate::cpu::par_map(v, |x| x.to_f32()))
            }
            (CpuView::I32(v), DType::F32) => CpuStorage::F32(crate::cpu::par_map(v, |x| *x as f32)),
            (CpuView::I32(v), DType::BF16) => {
                CpuStorage::BF16(crate::cpu::par_map(v, |x| bf16::from_f32(*x as f32)))
            }
            (CpuView::F32(v), DType::I32) => CpuStorage::I32(crate::cpu::par_map(v, |x| *x as i32)),
            (CpuView::BF16(v), DType::I32) => {
                CpuStorage::I32(crate::cpu::par_map(v, |x| x.to_f32() as i32))
            }
            // Same dtype: a copy (the op returns a shared handle before asking).
            (v, _) => map_cpu_view!(v, v => v.to_vec()),
        };
        Ok(Tensor::from_cpu(out, x.shape().clone()))
    }

    fn copy(&self, x: &Tensor) -> Result<Tensor> {
        let out = map_cpu_view!(x.cpu_view("deep_copy")?, v => v.to_vec());
        Ok(Tensor::from_cpu(out, x.shape().clone()))
    }
}
