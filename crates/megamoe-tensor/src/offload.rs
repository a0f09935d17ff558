//! Activation offload at the tensor level: [`Tensor::park`] moves a tensor's device buffer
//! to pinned host memory (the handle becomes an empty placeholder), [`ParkedTensor::fetch`]
//! queues the copy back, [`FetchedTensor::ready`] gives the tensor back with the same
//! shape, layout and bits. Everything is stream-ordered on the GPU (a copy stream and
//! events; no host synchronisation), see `megamoe_cuda::CopyStream`. Only CUDA tensors
//! park; [`parked_bytes`] counts the bytes moved to the host since the process started.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Layout, Result, Tensor};

static PARKED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes moved to pinned host memory by [`Tensor::park`] since the process started (all
/// threads). Take the difference of two calls for a span of work.
pub fn parked_bytes() -> u64 {
    PARKED_BYTES.load(Ordering::Relaxed)
}

/// A tensor whose buffer lives in pinned host memory until it is fetched.
#[derive(Debug)]
pub struct ParkedTensor {
    layout: Layout,
    #[cfg(feature = "cuda")]
    inner: crate::cuda::offload::ParkedBuffer,
}

/// A fetch in flight: the buffer is being copied back (see [`FetchedTensor::ready`]).
#[derive(Debug)]
pub struct FetchedTensor {
    layout: Layout,
    #[cfg(feature = "cuda")]
    inner: crate::cuda::offload::FetchedBuffer,
}

impl Tensor {
    /// Moves this tensor's buffer to pinned host memory when this handle is the buffer's
    /// only owner: returns the parked copy and leaves `self` an empty placeholder (any op
    /// on it fails on its shape or device). Returns `Ok(None)` and leaves `self` unchanged
    /// when another handle shares the buffer (nothing would be freed) or the buffer is
    /// write-through. Errors for a CPU tensor (host memory has nowhere to go).
    pub fn park(&mut self) -> Result<Option<ParkedTensor>> {
        if self.device() == crate::Device::Cpu {
            return Err(Error::InvalidArgument {
                op: "park",
                arg: "device",
                value: "cpu".into(),
                rule: "activation offload moves GPU tensors to host memory; a CPU tensor is there already",
            });
        }
        park_device(self)
    }
}

#[cfg(feature = "cuda")]
fn park_device(t: &mut Tensor) -> Result<Option<ParkedTensor>> {
    let Some((storage, layout)) = t.take_unique_storage() else {
        return Ok(None);
    };
    let inner = crate::cuda::offload::park(storage)?;
    PARKED_BYTES.fetch_add(inner.bytes() as u64, Ordering::Relaxed);
    Ok(Some(ParkedTensor { layout, inner }))
}

#[cfg(not(feature = "cuda"))]
fn park_device(_t: &mut Tensor) -> Result<Option<ParkedTensor>> {
    // Without the CUDA backend every tensor is on the CPU (refused above).
    Ok(None)
}

impl ParkedTensor {
    /// Bytes held on the host.
    pub fn bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.inner.bytes()
        }
        #[cfg(not(feature = "cuda"))]
        {
            0
        }
    }

    /// Queues the copy back to the device (a fresh buffer); the host copy stays until
    /// this handle drops.
    pub fn fetch(&self) -> Result<FetchedTensor> {
        #[cfg(feature = "cuda")]
        {
            Ok(FetchedTensor {
                layout: self.layout.clone(),
                inner: self.inner.fetch()?,
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            Ok(FetchedTensor {
                layout: self.layout.clone(),
            })
        }
    }
}

impl FetchedTensor {
    /// The tensor, with the device's stream told to wait for the copy first.
    pub fn ready(self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let storage = self.inner.ready()?;
            Ok(Tensor::from_storage_layout(storage, self.layout))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = self.layout;
            Err(Error::InvalidArgument {
                op: "fetch",
                arg: "device",
                value: "cpu".into(),
                rule: "nothing is parked without feature `cuda`",
            })
        }
    }
}
