//! The host-staged family: the named RNG, drawn on the host (the counter RNG's bits are
//! defined there) and uploaded, so parameters initialise identically on every backend.

use std::ops::Range;

use super::CudaBackend;
use crate::backend::{CpuBackend, HostTransfer};
use crate::ops::rng::{InitDist, RngKernels};
use crate::{Result, Shape, Tensor};

impl CudaBackend {
    /// A host tensor moved to this GPU.
    fn up(&self, t: Tensor) -> Result<Tensor> {
        let shape = t.shape().clone();
        let data = CpuBackend.to_host(&t)?;
        self.upload(data, shape)
    }
}

impl RngKernels for CudaBackend {
    /// Drawn on the host (the counter RNG's bits are defined there) and uploaded: no
    /// device read, parameters initialise identically on every backend.
    fn rand_named_slice(
        &self,
        seed: u64,
        name: &str,
        global_shape: &Shape,
        dim: usize,
        range: Range<usize>,
        dist: InitDist,
    ) -> Result<Tensor> {
        self.up(CpuBackend.rand_named_slice(seed, name, global_shape, dim, range, dist)?)
    }
}
