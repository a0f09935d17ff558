//! Devices. Only `Cpu` is compiled in today; `Cuda(ordinal)` exists in the type so that
//! callers can name it, and every constructor or op asked to use it returns
//! [`Error::DeviceNotAvailable`](crate::Error::DeviceNotAvailable) until the CUDA backend
//! (feature `cuda`) lands.

use std::fmt;

use crate::Result;

/// Where a tensor's storage lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, CPU backend (rayon + gemm).
    #[default]
    Cpu,
    /// A CUDA device by ordinal (needs feature `cuda`).
    Cuda(usize),
}

impl Device {
    /// Ok if this build can allocate on `self`.
    pub fn check_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(crate::Error::DeviceNotAvailable {
                device: self,
                reason: "this build has no CUDA backend (feature `cuda`)",
            }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
