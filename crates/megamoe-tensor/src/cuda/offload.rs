//! The CUDA side of activation offload (`crate::offload`): one copy stream per GPU
//! (megamoe-cuda's `CopyStream`), opened on first use.

use std::sync::OnceLock;

use megamoe_cuda::{CopyStream, Fetched, Parked};

use super::{cuda_backend, CudaBackend, CudaStorage};
use crate::{DType, Device, Error, Result, Storage};

/// One copy stream per GPU ordinal (the backends' 16).
static STREAMS: [OnceLock<std::result::Result<CopyStream, String>>; 16] =
    [const { OnceLock::new() }; 16];

fn copy_stream(b: &CudaBackend, ordinal: usize) -> Result<&'static CopyStream> {
    let slot = STREAMS.get(ordinal).ok_or(Error::DeviceNotAvailable {
        device: Device::Cuda(ordinal),
        reason: "GPU ordinal above the 16 this backend addresses",
    })?;
    let opened = slot.get_or_init(|| {
        b.engine("copy_stream")
            .and_then(|e| b.ck("copy_stream", e.gpu.copy_stream()))
            .map_err(|e| e.to_string())
    });
    opened.as_ref().map_err(|message| Error::Cuda {
        op: "copy_stream",
        device: Device::Cuda(ordinal),
        message: message.clone(),
    })
}

/// A parked CUDA buffer and what rebuilds its storage.
#[derive(Debug)]
pub(crate) struct ParkedBuffer {
    parked: Parked,
    dtype: DType,
    len: usize,
    ordinal: usize,
}

/// A CUDA fetch in flight.
#[derive(Debug)]
pub(crate) struct FetchedBuffer {
    fetched: Fetched,
    dtype: DType,
    len: usize,
    ordinal: usize,
}

/// Moves `storage`'s device buffer to pinned host memory (queued after the stream's work).
pub(crate) fn park(storage: Storage) -> Result<ParkedBuffer> {
    let Storage::Cuda(CudaStorage {
        buf,
        dtype,
        len,
        ordinal,
    }) = storage
    else {
        return Err(Error::InvalidArgument {
            op: "park",
            arg: "device",
            value: "cpu".into(),
            rule: "only CUDA buffers park",
        });
    };
    let b = cuda_backend(ordinal)?;
    let cs = copy_stream(b, ordinal)?;
    // Hold the engine while queueing so no other op interleaves on its stream.
    let _e = b.engine("park")?;
    let parked = b.ck("park", cs.park(buf))?;
    Ok(ParkedBuffer {
        parked,
        dtype,
        len,
        ordinal,
    })
}

impl ParkedBuffer {
    pub(crate) fn bytes(&self) -> usize {
        self.parked.bytes()
    }

    pub(crate) fn fetch(&self) -> Result<FetchedBuffer> {
        let b = cuda_backend(self.ordinal)?;
        let cs = copy_stream(b, self.ordinal)?;
        let _e = b.engine("fetch")?;
        Ok(FetchedBuffer {
            fetched: b.ck("fetch", cs.fetch(&self.parked))?,
            dtype: self.dtype,
            len: self.len,
            ordinal: self.ordinal,
        })
    }
}

impl FetchedBuffer {
    pub(crate) fn ready(self) -> Result<Storage> {
        let b = cuda_backend(self.ordinal)?;
        let _e = b.engine("fetch_ready")?;
        let buf = b.ck("fetch_ready", self.fetched.ready())?;
        Ok(Storage::Cuda(CudaStorage {
            buf,
            dtype: self.dtype,
            len: self.len,
            ordinal: self.ordinal,
        }))
    }
}
