//! The GPU pool counters of a trainer's device for the step metrics: a new peak window at
//! the step's start, reserved / used / peak bytes at its end (host-side counters: no
//! synchronisation). Nothing on the CPU or in a build without feature `cuda`.

use megamoe_tensor::Device;

use crate::error::Result;
use crate::metrics::GpuPoolBytes;

/// Starts a new peak window of `device`'s pool (a no-op on the CPU).
#[cfg(feature = "cuda")]
pub(crate) fn reset_peak(device: Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        megamoe_tensor::cuda::cuda_backend(i)?.reset_peak()?;
    }
    Ok(())
}

/// `device`'s pool counters (`None` on the CPU).
#[cfg(feature = "cuda")]
pub(crate) fn bytes(device: Device) -> Result<Option<GpuPoolBytes>> {
    let Device::Cuda(i) = device else {
        return Ok(None);
    };
    let s = megamoe_tensor::cuda::cuda_backend(i)?.pool_stats()?;
    Ok(Some(GpuPoolBytes {
        reserved: s.reserved,
        used: s.used,
        peak: s.peak,
    }))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn reset_peak(_device: Device) -> Result<()> {
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn bytes(_device: Device) -> Result<Option<GpuPoolBytes>> {
    Ok(None)
}
