//! The GPU pool counters of a trainer's device for the step metrics: a new peak window at
//! the step's start, reserved / used / peak bytes at its end (host-side counters: no
//! synchronisation). Nothing on the CPU or in a build without feature `cuda`. Also the
//! planner's prediction of the pool peak for the attention kernel the device runs.

use megamoe_plan::{plan_memory_with, AttentionKernel, Plan};
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

/// The attention kernel `device` runs: fused (cuDNN SDPA or megamoe's own kernel, both
/// keep the log-sum-exp) where the CUDA backend runs one, else unfused.
#[cfg(feature = "cuda")]
pub fn attention_kernel(device: Device) -> Result<AttentionKernel> {
    let Device::Cuda(i) = device else {
        return Ok(AttentionKernel::Unfused);
    };
    let status = megamoe_tensor::cuda::cuda_backend(i)?.attention_status()?;
    Ok(if status.starts_with("unfused") {
        AttentionKernel::Unfused
    } else {
        AttentionKernel::Fused
    })
}

/// The attention kernel `device` runs (always unfused without feature `cuda`).
#[cfg(not(feature = "cuda"))]
pub fn attention_kernel(_device: Device) -> Result<AttentionKernel> {
    Ok(AttentionKernel::Unfused)
}

/// The planner's predicted peak of tensor memory for `plan` on `device`, in bytes: model
/// state plus the activation peak (what the GPU pool's `peak`, or the CPU's measured
/// `memory_bytes`, counts; without the runtime reserve and the per-process overhead).
pub fn predicted_peak_bytes(plan: &Plan, device: Device) -> Result<u64> {
    let m = plan_memory_with(plan, None, attention_kernel(device)?);
    Ok((m.peak_pool_gb * (1u64 << 30) as f64).round() as u64 + engine_pool_bytes(device))
}

/// What a GPU engine takes from its pool when it opens (the cuBLAS workspace).
#[cfg(feature = "cuda")]
fn engine_pool_bytes(device: Device) -> u64 {
    match device {
        Device::Cuda(_) => megamoe_tensor::cuda::ENGINE_POOL_BYTES as u64,
        Device::Cpu => 0,
    }
}

#[cfg(not(feature = "cuda"))]
fn engine_pool_bytes(_device: Device) -> u64 {
    0
}
