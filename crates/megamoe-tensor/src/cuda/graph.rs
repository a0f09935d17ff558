//! Whole-region CUDA graphs through the backend: [`CudaBackend::begin_capture`] starts
//! recording the engine's stream, every op after it queues into the recording (uploads
//! read pinned copies kept with the graph; host reads fail with a named error), and
//! [`CudaBackend::end_capture`] returns a [`StepGraph`] that [`CudaBackend::replay`]
//! runs again. Tensors the captured ops allocated stay at the same addresses for the
//! graph's life and are rewritten by each replay (see megamoe-cuda's `graph.rs`); inputs
//! that change between replays must live in buffers allocated before the capture and be
//! overwritten in place ([`CudaBackend::overwrite_i32`]).

use super::{view, CudaBackend, CudaStorage};
use crate::ops::optim::AdamWStep;
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

impl CudaBackend {
    /// [`Tensor::adamw_step`] for a captured graph: the constants come from `consts`, an i32
    /// tensor of the nine words of [`CudaBackend::adamw_device_words`], and the update runs only when the
    /// one-element f32 `apply` is not 0 (else `param`, `m` and `v` keep their values), so
    /// a replay uses whatever the host wrote into `consts` before it and whatever the step
    /// computed into `apply`. Same f32 operations in the same order as `adamw_step` (bf16
    /// moments as there). `param` (f32) and `m`, `v` (both f32 or both bf16) are written
    /// where they are: each must be either a
    /// write-through view or a whole buffer nobody else holds (a copy-on-write would move
    /// it, which a graph cannot follow).
    pub fn adamw_step_device(
        &self,
        param: &mut Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        grad: &Tensor,
        consts: &Tensor,
        apply: &Tensor,
    ) -> Result<()> {
        const OP: &str = "adamw_step_device";
        param.same_shape(OP, grad)?;
        m.same_shape(OP, grad)?;
        v.same_shape(OP, grad)?;
        if consts.dtype() != DType::I32 || consts.numel() != 9 {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "consts",
                value: format!("{:?} {:?}", consts.dtype(), consts.dims()),
                rule: "nine i32 words (adamw_device_words)",
            });
        }
        if apply.dtype() != DType::F32 || apply.numel() != 1 {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "apply",
                value: format!("{:?} {:?}", apply.dtype(), apply.dims()),
                rule: "one f32",
            });
        }
        let moments = super::flat_optim::moment_type(OP, m, v)?;
        let dtype = super::flat_optim::moment_dtype(moments);
        param.make_unique_f32(|t| Err(super::flat_optim::not_in_place(OP, "param", t)))?;
        for (arg, t) in [("m", &mut *m), ("v", &mut *v)] {
            t.make_unique_as_or_write_through(dtype, |t| {
                Err(super::flat_optim::not_in_place(OP, arg, t))
            })?;
        }
        let n = grad.numel();
        if n == 0 {
            return Ok(());
        }
        let e = self.engine(OP)?;
        let ops = if grad.dtype() == DType::BF16 {
            &e.ops_bf16
        } else {
            &e.ops_f32
        };
        let (pv, mv, vv, gv) = (
            view(OP, param)?,
            view(OP, m)?,
            view(OP, v)?,
            view(OP, grad)?,
        );
        let (cv, av) = (view(OP, consts)?, view(OP, apply)?);
        self.ck(
            OP,
            ops.adamw_device(&e.gpu, &pv, &mv, &vv, &gv, (n, moments), &cv, &av),
        )
    }

    /// The nine i32 words [`CudaBackend::adamw_step_device`] reads for the step `h`: the
    /// f32 constants (bits) and the decay switch that [`Tensor::adamw_step`] passes by
    /// value. Host arithmetic only.
    pub fn adamw_device_words(&self, h: &AdamWStep) -> Result<[i32; 9]> {
        let p = megamoe_cuda::AdamWParams {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            t: h.t,
        };
        self.ck("adamw_device_words", p.device_words())
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
