//! Whole-region CUDA graphs through the backend: [`CudaBackend::begin_capture`] starts
//! recording the engine's stream, every op after it queues into the recording (uploads
//! read pinned copies kept with the graph; host reads fail with a named error), and
//! [`CudaBackend::end_capture`] returns a [`StepGraph`] that [`CudaBackend::replay`]
//! runs again. Tensors the captured ops allocated stay at the same addresses for the
//! graph's life and are rewritten by each replay (see megamoe-cuda's `graph.rs`); inputs
//! that change between replays must live in buffers allocated before the capture and be
//! overwritten in place ([`CudaBackend::overwrite_i32`]).

use super::{CudaBackend, CudaStorage};
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

/// A captured region of work on one GPU and the pinned host copies its uploads read.
#[derive(Debug)]
pub struct StepGraph {
    graph: megamoe_cuda::Graph,
    _staged: Vec<megamoe_cuda::PinnedHost>,
    ordinal: usize,
}

impl CudaBackend {
    /// Waits for queued work, then records instead of running until
    /// [`CudaBackend::end_capture`]. Errors if a capture is already under way.
    pub fn begin_capture(&self) -> Result<()> {
        const OP: &str = "begin_capture";
        let mut e = self.engine(OP)?;
        if e.capture.is_some() {
            return Err(self.err(
                OP,
                megamoe_cuda::Error::Invalid {
                    field: "capture",
                    value: "already capturing".to_string(),
                    rule: "one captured region at a time",
                },
            ));
        }
        self.ck(OP, e.gpu.begin_capture())?;
        e.capture = Some(Vec::new());
        Ok(())
    }

    /// Whether a capture is under way.
    pub fn is_capturing(&self) -> Result<bool> {
        Ok(self.engine("is_capturing")?.capture.is_some())
    }

    /// Ends the capture and instantiates the recorded work. Nothing recorded has run yet:
    /// [`CudaBackend::replay`] the graph to run it. Call it also when the captured code
    /// failed, to leave capture mode (then drop the graph or the error).
    pub fn end_capture(&self) -> Result<StepGraph> {
        const OP: &str = "end_capture";
        let mut e = self.engine(OP)?;
        let staged = e.capture.take().unwrap_or_default();
        let graph = self.ck(OP, e.gpu.end_capture())?;
        Ok(StepGraph {
            graph,
            _staged: staged,
            ordinal: self.ordinal,
        })
    }

    /// Queues one run of `graph` (captured on this GPU).
    pub fn replay(&self, graph: &StepGraph) -> Result<()> {
        const OP: &str = "replay";
        if graph.ordinal != self.ordinal {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "graph",
                value: format!("captured on cuda:{}", graph.ordinal),
                rule: "a graph replays on the GPU it was captured on",
            });
        }
        let e = self.engine(OP)?;
        self.ck(OP, e.gpu.replay(&graph.graph))
    }

    /// Writes `data` into the contiguous i32 tensor `dst` in place (same buffer, same
    /// address: a captured graph that reads `dst` sees the new values). Synchronises;
    /// not allowed while capturing.
    pub fn overwrite_i32(&self, dst: &Tensor, data: &[i32]) -> Result<()> {
        const OP: &str = "overwrite_i32";
        if dst.dtype() != DType::I32 || dst.numel() != data.len() {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "dst",
                value: format!("{:?} {:?}", dst.dtype(), dst.dims()),
                rule: "an i32 tensor with one element per value",
            });
        }
        let e = self.engine(OP)?;
        if e.capture.is_some() {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "dst",
                value: "while capturing".to_string(),
                rule: "overwrite graph inputs before the captured region or its replay",
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        let dst = super::view(OP, dst)?;
        self.ck(OP, e.gpu.upload(&dst, data))
    }
}

/// The device address of `t`'s first element (`None` off the GPU): a captured graph is
/// valid only while the tensors it touches stay at the addresses it recorded.
pub fn device_address(t: &Tensor) -> Option<u64> {
    match t.storage() {
        Storage::Cuda(s) => {
            Some(CudaStorage::ptr(s) + (t.layout().offset() * t.dtype().size_in_bytes()) as u64)
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
