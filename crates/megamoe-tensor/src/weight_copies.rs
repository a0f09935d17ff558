//! [`WeightCopies`]: a step's registration of the model weights, so that a device backend
//! running its GEMMs in a lower precision casts each f32 master weight once per step.

use crate::{Device, Result, Tensor};

/// The weights of one training step, registered with the device backend from
/// [`WeightCopies::begin`] until drop. On a GPU in bf16-matmul mode the first bf16 cast of a
/// registered f32 weight (or of a view of one) fills a bf16 copy that every later matmul
/// of the step reads instead of casting again (bit-identical results: the same cast of
/// the same elements); the copies keep their device addresses from step to step. While
/// registered, a weight cannot be written in place (in-place ops copy-on-write it), so
/// a copy never goes stale; a replaced weight (an optimizer update, a loaded checkpoint)
/// is simply not registered any more. Begin after the optimizer step and drop before the
/// next one. On the CPU, and for tensors that are not f32 or live in write-through
/// buffers, this does nothing.
#[derive(Debug)]
#[must_use = "the weights stay registered only while the guard lives"]
pub struct WeightCopies {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
}

impl WeightCopies {
    /// Registers `weights` (tensors on `device`; others are ignored) for one step. A new
    /// registration on the same device replaces the previous one.
    pub fn begin(device: Device, weights: &[Tensor]) -> Result<WeightCopies> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(ordinal) = device {
            crate::cuda::cuda_backend(ordinal)?.register_weights(weights);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = weights;
        Ok(WeightCopies { device })
    }
}

impl Drop for WeightCopies {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(ordinal) = self.device {
            if let Ok(backend) = crate::cuda::cuda_backend(ordinal) {
                backend.release_weights();
            }
        }
    }
}
