//! [`HostTransfer`] on the GPU: uploads, downloads (the only synchronising calls), fills,
//! casts and copies.

use half::bf16;

use super::{dev, CudaBackend, CudaStorage};
use crate::backend::HostTransfer;
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Result, Shape, Tensor};

/// Device copies of [`Tensor::constant_i32`] values by (dims, content): kept for the
/// backend's life (a few small tensors: group offsets and sizes of each MoE shape).
pub(crate) type Constants = std::collections::HashMap<(Vec<usize>, Vec<i32>), Tensor>;

impl HostTransfer for CudaBackend {
    fn constant_i32(&self, data: Vec<i32>, shape: Shape) -> Result<Tensor> {
        let lock = || self.constants.lock().unwrap_or_else(|p| p.into_inner());
        let key = (shape.dims().to_vec(), data);
        if let Some(t) = lock().get(&key) {
            return Ok(t.clone());
        }
        // Made inside a captured region, the buffer would be the graph's: upload without
        // keeping it (the warm-up step before a capture fills the cache).
        let capturing = self.engine("constant_i32")?.capture.is_some();
        let t = self.upload(CpuStorage::I32(key.1.clone()), shape)?;
        if !capturing {
            lock().insert(key, t.clone());
        }
        Ok(t)
    }

    fn upload(&self, data: CpuStorage, shape: Shape) -> Result<Tensor> {
        const OP: &str = "upload";
        let mut e = self.engine(OP)?;
        let (t, _) = self.empty(&e, shape, data.dtype())?;
        if let Storage::Cuda(s) = t.storage() {
            if e.capture.is_some() {
                // Inside a captured step: the copy reads pinned memory kept with the graph.
                let staged = match &data {
                    CpuStorage::F32(v) if !v.is_empty() => Some(e.gpu.upload_staged(&s.buf, v)),
                    CpuStorage::BF16(v) if !v.is_empty() => Some(e.gpu.upload_staged(&s.buf, v)),
                    CpuStorage::I32(v) if !v.is_empty() => Some(e.gpu.upload_staged(&s.buf, v)),
                    _ => None,
                };
                if let Some(staged) = staged {
                    let pinned = self.ck(OP, staged)?;
                    e.capture.get_or_insert_with(Vec::new).push(pinned);
                }
                return Ok(t);
            }
            let r = match &data {
                CpuStorage::F32(v) if !v.is_empty() => e.gpu.upload(&s.buf, v),
                CpuStorage::BF16(v) if !v.is_empty() => e.gpu.upload(&s.buf, v),
                CpuStorage::I32(v) if !v.is_empty() => e.gpu.upload(&s.buf, v),
                _ => Ok(()),
            };
            self.ck(OP, r)?;
        }
        Ok(t)
    }

    fn to_host(&self, x: &Tensor) -> Result<CpuStorage> {
        const OP: &str = "to_host";
        let e = self.engine(OP)?;
        if e.capture.is_some() {
            return Err(self.err(OP, megamoe_cuda::Error::Invalid {
                field: "to_host",
                value: "a host read".to_string(),
                rule: "not allowed inside a captured CUDA graph region (the step reads after its replay)",
            }));
        }
        let Storage::Cuda(s) = x.storage() else {
            return Err(crate::Error::NotOnCpu {
                op: OP,
                device: x.device(),
            });
        };
        let n = x.numel();
        if n == 0 {
            return Ok(match s.dtype {
                DType::F32 => CpuStorage::F32(Vec::new()),
                DType::BF16 => CpuStorage::BF16(Vec::new()),
                DType::I32 => CpuStorage::I32(Vec::new()),
            });
        }
        let src = super::view(OP, x)?;
        let data = match s.dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                self.ck(OP, e.gpu.download(&src, &mut v))?;
                CpuStorage::F32(v)
            }
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; n];
                self.ck(OP, e.gpu.download(&src, &mut v))?;
                CpuStorage::BF16(v)
            }
            DType::I32 => {
                let mut v = vec![0i32; n];
                self.ck(OP, e.gpu.download(&src, &mut v))?;
                CpuStorage::I32(v)
            }
        };
        // The download synchronised the stream: report any failed device index check.
        self.check_device_errors(&e)?;
        Ok(data)
    }

    fn full(&self, shape: Shape, value: f32, dtype: DType) -> Result<Tensor> {
        const OP: &str = "full";
        let e = self.engine(OP)?;
        let n = shape.numel();
        let (t, d) = self.empty(&e, shape, dtype)?;
        // SAFETY: `d` is the fresh buffer of `n` elements.
        self.ck(OP, unsafe { e.tk.fill(&e.gpu, d, n, value) })?;
        Ok(t)
    }

    fn to_dtype(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        // Named apart in the op profile: a cast, or a same-dtype copy (copy-on-write).
        const OP: &str = "to_dtype";
        let e = self.engine(if dtype == x.dtype() { "copy" } else { OP })?;
        let n = x.numel();
        let src = dev(OP, x)?;
        let (t, d) = self.empty(&e, x.shape().clone(), dtype)?;
        // SAFETY: `src` holds `x`'s n elements, `d` the fresh n-element buffer.
        self.ck(OP, unsafe { e.tk.cast(&e.gpu, src, d, n) })?;
        Ok(t)
    }

    fn copy(&self, x: &Tensor) -> Result<Tensor> {
        self.to_dtype(x, x.dtype())
    }
}

impl CudaStorage {
    /// Bytes of the device allocation.
    pub fn bytes(&self) -> usize {
        self.buf.bytes()
    }
}
