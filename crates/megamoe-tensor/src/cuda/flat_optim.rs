//! The optimizer step over every parameter at once: the global gradient norm in two
//! launches and AdamW in one ([`CudaBackend::segments_grad_norm`],
//! [`CudaBackend::segments_adamw`]), driven by a device table of the parameters' segments
//! ([`OptimizerSegments`]) instead of one reduction, one clip scaling and one AdamW launch
//! per parameter. The bits are those of the per-parameter ops: the norm reproduces their
//! summation order exactly, the clip factor multiplies each gradient element inside the
//! AdamW launch exactly as the in-place scaling did, and the update is the same f32
//! sequence. Capturable: nothing is read back.
//!
//! The AdamW launch also writes the bf16 copy of every updated weight that has a weight
//! copy slot (`weights.rs`), so the next step's first cast of it finds the copy filled.

use megamoe_cuda::{AdamWSegment, Moments, SegmentTable};

use super::weights::CopyMarks;
use super::{dev, view, CudaBackend};
use crate::{DType, Error, Result, Tensor};

/// The segment table of one optimizer step on the device, with the tensors' addresses it
/// was made from (valid while those tensors stay where they are: make it again when one
/// moves, as a captured graph's address check does).
#[derive(Debug)]
pub struct OptimizerSegments {
    table: SegmentTable,
    device: Tensor,
    /// The weight copies the AdamW launch writes.
    copies: CopyMarks,
}

impl OptimizerSegments {
    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.table.segments
    }

    /// Always false (a table has at least one segment).
    pub fn is_empty(&self) -> bool {
        self.table.segments == 0
    }

    /// The device table (its address belongs in a captured graph's address check).
    pub fn device_table(&self) -> &Tensor {
        &self.device
    }
}

impl CudaBackend {
    /// One parameter's segment: `param` f32, `m`, `v` both f32 or both bf16
    /// (`optim.moment_dtype`), all three writable in place (write-through views or whole
    /// unshared buffers), `grad` f32, all of one shape. The segment writes `param`'s bf16
    /// weight copy too where it has one (`weights.rs`).
    pub fn adamw_segment(
        &self,
        param: &mut Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        grad: &Tensor,
        decay: bool,
    ) -> Result<AdamWSegment> {
        const OP: &str = "adamw_segment";
        param.same_shape(OP, grad)?;
        m.same_shape(OP, grad)?;
        v.same_shape(OP, grad)?;
        if grad.dtype() != DType::F32 {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "grad",
                value: format!("{:?}", grad.dtype()),
                rule: "f32 (the flat gradient buffer)",
            });
        }
        let moments = moment_type(OP, m, v)?;
        // Not counted as a write of `param`: the launch writes its copy with it.
        param.claim_f32_in_place(|t| Err(not_in_place(OP, "param", t)))?;
        for (arg, t) in [("m", &mut *m), ("v", &mut *v)] {
            t.claim_in_place(moment_dtype(moments), |t| Err(not_in_place(OP, arg, t)))?;
        }
        let addr = |t: &Tensor| dev(OP, t).map(|d| d.ptr);
        Ok(AdamWSegment {
            p: addr(param)?,
            g: addr(grad)?,
            m: addr(m)?,
            v: addr(v)?,
            moments,
            n: grad.numel(),
            decay,
            copy: self.adamw_copy_for(param),
        })
    }

    /// Uploads the table of `segs` (in the order the norm sums them: the gradients' visit
    /// order).
    pub fn optimizer_segments(&self, segs: &[AdamWSegment]) -> Result<OptimizerSegments> {
        let table = self.ck("optimizer_segments", SegmentTable::new(segs))?;
        let words: Vec<i32> = table
            .words
            .iter()
            .flat_map(|w| [*w as u32 as i32, (*w >> 32) as u32 as i32])
            .collect();
        let n = words.len();
        let device = Tensor::from_vec_i32(words, [n], crate::Device::Cuda(self.ordinal))?;
        let copies = self.take_copy_marks(segs.iter().map(|s| s.copy).filter(|&c| c != 0));
        Ok(OptimizerSegments {
            table,
            device,
            copies,
        })
    }

    /// The global L2 norm of every segment's gradient as a rank-0 f32 tensor: the bits of
    /// `√(Σ_g g.sum_squares())` as megamoe-optim's `global_grad_norm_tensor` computes it
    /// gradient by gradient, in two launches.
    pub fn segments_grad_norm(&self, s: &OptimizerSegments) -> Result<Tensor> {
        const OP: &str = "segments_grad_norm";
        let table = dev(OP, &s.device)?.ptr;
        let e = self.engine(OP)?;
        let (out, od) = self.empty(&e, Vec::new().into(), DType::F32)?;
        // SAFETY: the table holds live f32 gradient addresses (made by `adamw_segment`
        // from tensors the caller keeps in place); `out` is one f32.
        self.ck(OP, unsafe {
            e.ops_f32.segments_norm(&e.gpu, table, &s.table, od.ptr)
        })?;
        Ok(out)
    }

    /// AdamW on every segment in one launch: constants from `with` / `without` (the nine
    /// i32 words of [`CudaBackend::adamw_device_words`] with and without weight decay), the
    /// gradients multiplied by the rank-0 f32 `scale` first when given (the clip factor),
    /// nothing at all where the one-f32 `apply` is given and 0. Per element the f32
    /// operations of `Tensor::adamw_step` on the scaled gradient; the weight copies of the
    /// table get the updated weights (and count as filled at the next registration).
    pub fn segments_adamw(
        &self,
        s: &OptimizerSegments,
        (with, without): (&Tensor, &Tensor),
        scale: Option<&Tensor>,
        apply: Option<&Tensor>,
    ) -> Result<()> {
        const OP: &str = "segments_adamw";
        for (arg, t) in [("with", with), ("without", without)] {
            if t.dtype() != DType::I32 || t.numel() != 9 {
                return Err(Error::InvalidArgument {
                    op: OP,
                    arg,
                    value: format!("{:?} {:?}", t.dtype(), t.dims()),
                    rule: "nine i32 words (adamw_device_words)",
                });
            }
        }
        for (arg, t) in [("scale", scale), ("apply", apply)] {
            if let Some(t) = t.filter(|t| t.dtype() != DType::F32 || t.numel() != 1) {
                return Err(Error::InvalidArgument {
                    op: OP,
                    arg,
                    value: format!("{:?} {:?}", t.dtype(), t.dims()),
                    rule: "one f32",
                });
            }
        }
        let ptr = |t: Option<&Tensor>| -> Result<u64> { t.map_or(Ok(0), |t| Ok(dev(OP, t)?.ptr)) };
        let (table, w, wo) = (dev(OP, &s.device)?.ptr, view(OP, with)?, view(OP, without)?);
        let (sp, ap) = (ptr(scale)?, ptr(apply)?);
        let e = self.engine(OP)?;
        // SAFETY: the table's addresses are live f32 buffers written in place (checked by
        // `adamw_segment`); the constants are nine words each, scale and apply one f32.
        self.ck(OP, unsafe {
            use megamoe_cuda::DeviceMem;
            e.ops_f32
                .adamw_segments(&e.gpu, table, &s.table, (w.ptr(), wo.ptr()), sp, ap)
        })?;
        drop(e);
        self.mark_copies_written(&s.copies);
        Ok(())
    }
}

/// The error of an optimizer operand that cannot be written in place (`arg` of `op`).
pub(super) fn not_in_place(op: &'static str, arg: &'static str, t: &Tensor) -> Error {
    Error::InvalidArgument {
        op,
        arg,
        value: format!("{:?} {:?}, shared or offset", t.dtype(), t.dims()),
        rule:
            "written in place: a write-through view or a whole unshared buffer (f32; bf16 moments)",
    }
}

/// The element type of the moments `m` and `v` of `op`: both f32 or both bf16, else a named
/// error.
pub(super) fn moment_type(op: &'static str, m: &Tensor, v: &Tensor) -> Result<Moments> {
    match (m.dtype(), v.dtype()) {
        (DType::F32, DType::F32) => Ok(Moments::F32),
        (DType::BF16, DType::BF16) => Ok(Moments::Bf16),
        (a, b) => Err(Error::InvalidArgument {
            op,
            arg: "m, v",
            value: format!("{a:?} and {b:?}"),
            rule: "the two moments are both f32 or both bf16",
        }),
    }
}

/// The tensor dtype of moments of type `m`.
pub(super) fn moment_dtype(m: Moments) -> DType {
    match m {
        Moments::F32 => DType::F32,
        Moments::Bf16 => DType::BF16,
    }
}
