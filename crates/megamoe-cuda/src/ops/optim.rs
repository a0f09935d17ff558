//! Fused AdamW over f32 master weights and f32 or bf16 moments ([`Moments`]), with an
//! optional copy of the updated weights in the storage type (the bf16 weights the next forward reads); and the
//! flat-buffer optimizer: the global gradient norm and AdamW over every parameter in one
//! launch each, from a table of segments ([`SegmentTable`]).

use super::{int, need, positive, stride_grid, Ops, BLOCK};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};
use crate::pool::DeviceMem;

/// Scalars of one AdamW step (PyTorch `torch.optim.AdamW` order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate η.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay λ (0 for none).
    pub weight_decay: f64,
    /// 1-based step count for the bias corrections (0 counts as 1).
    pub t: u64,
}

/// The element type of AdamW's two moments (`optim.moment_dtype`). bf16 moments are widened
/// to f32, updated by the same f32 operations as f32 ones (the weight update uses the new,
/// unrounded f32 moments) and stored rounded to nearest even.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Moments {
    /// f32 moments (4 bytes each).
    #[default]
    F32,
    /// bf16 moments (2 bytes each).
    Bf16,
}

impl Moments {
    /// Bytes per moment element.
    pub fn size(self) -> usize {
        match self {
            Moments::F32 => 4,
            Moments::Bf16 => 2,
        }
    }

    /// The kernels' `m16` switch.
    fn flag(self) -> i32 {
        i32::from(self == Moments::Bf16)
    }
}

/// Layout of `AdamWConsts` in kernels.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AdamWConsts {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bc2: f32,
    eps: f32,
    decay: f32,
    step: f32,
    has_decay: i32,
}

impl AdamWParams {
    /// The constants [`Ops::adamw_device`] reads, as the nine 32-bit words of the kernel's
    /// `AdamWConsts` (f32 bits, then `has_decay`): what [`Ops::adamw`] passes by value.
    pub fn device_words(&self) -> Result<[i32; 9]> {
        let c = self.consts()?;
        let f = |x: f32| x.to_bits() as i32;
        Ok([
            f(c.beta1),
            f(c.one_minus_beta1),
            f(c.beta2),
            f(c.one_minus_beta2),
            f(c.inv_bc2),
            f(c.eps),
            f(c.decay),
            f(c.step),
            c.has_decay,
        ])
    }

    /// The f32 constants, rounded as megamoe-tensor's `adamw_step` rounds them.
    fn consts(&self) -> Result<AdamWConsts> {
        for (field, v) in [
            ("adamw lr", self.lr),
            ("adamw beta1", self.beta1),
            ("adamw beta2", self.beta2),
            ("adamw eps", self.eps),
            ("adamw weight_decay", self.weight_decay),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(field, v, "must be finite"));
            }
        }
        let t = self.t.clamp(1, i32::MAX as u64) as i32;
        Ok(AdamWConsts {
            beta1: self.beta1 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            inv_bc2: (1.0 / (1.0 - self.beta2.powi(t))) as f32,
            eps: self.eps as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            step: (-self.lr / (1.0 - self.beta1.powi(t))) as f32,
            has_decay: i32::from(self.weight_decay != 0.0),
        })
    }
}

impl Ops {
    /// One fused AdamW update in place over `n` elements: `p` f32, `m`, `v` of `moments`,
    /// `grad` in the storage type; `p_copy` (if given) receives the updated weights in the
    /// storage type. Per element the same f32 operations, unfused and in the same order, as
    /// megamoe-tensor's `adamw_step`, so results match it bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        gpu: &Gpu,
        p: &impl DeviceMem,
        m: &impl DeviceMem,
        v: &impl DeviceMem,
        grad: &impl DeviceMem,
        p_copy: Option<&dyn DeviceMem>,
        (n, moments): (usize, Moments),
        h: &AdamWParams,
    ) -> Result<()> {
        positive("adamw elements", n)?;
        let c = h.consts()?;
        need("adamw p", p, n, 4)?;
        need("adamw m", m, n, moments.size())?;
        need("adamw v", v, n, moments.size())?;
        need("adamw grad", grad, n, self.elem.size())?;
        if let Some(pc) = p_copy {
            need("adamw p_copy", pc, n, self.elem.size())?;
        }
        let copy = p_copy.map_or(0u64, |b| b.ptr());
        let m16 = moments.flag();
        unsafe {
            gpu.launch(
                self.k.adamw,
                stride_grid(n),
                BLOCK,
                &mut [
                    arg(&p.ptr()),
                    arg(&m.ptr()),
                    arg(&v.ptr()),
                    arg(&grad.ptr()),
                    arg(&copy),
                    arg(&n),
                    arg(&c),
                    arg(&m16),
                ],
            )
        }
    }

    /// [`Ops::adamw`] with its constants read from device memory (`consts`: the nine
    /// words of [`AdamWParams::device_words`]) and a go-ahead `apply` (one f32; 0 leaves
    /// `p`, `m` and `v` untouched), so a captured graph replays it with new values. No
    /// weight copy.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_device(
        &self,
        gpu: &Gpu,
        p: &impl DeviceMem,
        m: &impl DeviceMem,
        v: &impl DeviceMem,
        grad: &impl DeviceMem,
        (n, moments): (usize, Moments),
        consts: &impl DeviceMem,
        apply: &impl DeviceMem,
    ) -> Result<()> {
        positive("adamw elements", n)?;
        need("adamw p", p, n, 4)?;
        need("adamw m", m, n, moments.size())?;
        need("adamw v", v, n, moments.size())?;
        need("adamw grad", grad, n, self.elem.size())?;
        need("adamw consts", consts, 9, 4)?;
        need("adamw apply", apply, 1, 4)?;
        let m16 = moments.flag();
        unsafe {
            gpu.launch(
                self.k.adamw_dev,
                stride_grid(n),
                BLOCK,
                &mut [
                    arg(&p.ptr()),
                    arg(&m.ptr()),
                    arg(&v.ptr()),
                    arg(&grad.ptr()),
                    arg(&n),
                    arg(&consts.ptr()),
                    arg(&apply.ptr()),
                    arg(&m16),
                ],
            )
        }
    }
}

/// One parameter of a many-parameter AdamW step: the device addresses of its f32 parameter,
/// f32 gradient and two moments (each `n` elements of `moments`, written in place), whether
/// weight decay applies to it, and where its bf16 copy goes (if anywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdamWSegment {
    /// Parameter (f32).
    pub p: u64,
    /// Gradient (f32).
    pub g: u64,
    /// First moment.
    pub m: u64,
    /// Second moment.
    pub v: u64,
    /// The moments' element type.
    pub moments: Moments,
    /// Elements.
    pub n: usize,
    /// Weight decay applies.
    pub decay: bool,
    /// `n` bf16 that receive the updated parameter (the cast kernel's rounding), or 0.
    pub copy: u64,
}

/// Elements one block of `adamw_segments` updates (its chunk: two float4 per thread).
const ADAMW_BLOCK_ELEMS: usize = BLOCK as usize * 8;

/// The device table of [`Ops::segments_norm`] and [`Ops::adamw_segments`]: 9 u64 words per
/// segment (p, g, m, v, n, flags (bit 0: weight decay, bit 1: bf16 moments), first AdamW
/// block, first norm block, bf16 copy or 0),
/// then the segment of every AdamW block (one u32 each, two to a word, low half first: the
/// launch finds its segment with one load instead of a search), and the grids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentTable {
    /// The words to upload: the segments in order, then the AdamW blocks' segments.
    pub words: Vec<u64>,
    /// Segments.
    pub segments: usize,
    /// Blocks of the norm's first pass (each segment's `sum_all` grid).
    pub norm_blocks: usize,
    /// Blocks of the AdamW launch.
    pub adamw_blocks: usize,
}

impl SegmentTable {
    /// The table of `segs` (in this order: the norm sums them in this order).
    pub fn new(segs: &[AdamWSegment]) -> Result<SegmentTable> {
        positive("optimizer segments", segs.len())?;
        int("optimizer segments", segs.len())?;
        let (mut words, mut adamw, mut norm) = (Vec::with_capacity(segs.len() * 9), 0, 0);
        for s in segs {
            words.extend([
                s.p,
                s.g,
                s.m,
                s.v,
                s.n as u64,
                u64::from(s.decay) | (u64::from(s.moments == Moments::Bf16) << 1),
                adamw as u64,
                norm as u64,
                s.copy,
            ]);
            adamw += s.n.div_ceil(ADAMW_BLOCK_ELEMS).max(1);
            norm += stride_grid(s.n) as usize;
        }
        int("optimizer blocks", adamw.max(norm))?;
        let mut block_segment = Vec::with_capacity(adamw);
        for (i, s) in segs.iter().enumerate() {
            let blocks = s.n.div_ceil(ADAMW_BLOCK_ELEMS).max(1);
            block_segment.extend(std::iter::repeat_n(i as u64, blocks));
        }
        words.extend(
            block_segment
                .chunks(2)
                .map(|c| c[0] | c.get(1).map_or(0, |h| h << 32)),
        );
        Ok(SegmentTable {
            words,
            segments: segs.len(),
            norm_blocks: norm,
            adamw_blocks: adamw,
        })
    }
}

impl Ops {
    /// `out[0]` (f32) = the global L2 norm of every segment's gradient, bit for bit what
    /// megamoe-tensor computes per gradient and then over the list (`sum_squares` of each,
    /// concatenated, `sum_all`, `sqrt`): f64 sums of fixed slices, each gradient's sum
    /// rounded to f32, those summed in f64 and the root taken in f32. Two launches
    /// whatever the number of gradients. `table` holds `t.words` on the device.
    ///
    /// # Safety
    /// `table` must hold `t`'s words, whose gradient addresses must be live f32 buffers of
    /// their `n` elements; `out` one f32.
    pub unsafe fn segments_norm(
        &self,
        gpu: &Gpu,
        table: u64,
        t: &SegmentTable,
        out: u64,
    ) -> Result<()> {
        let partial = gpu.alloc(t.norm_blocks * 8)?;
        let nseg = t.segments as i32;
        gpu.launch(
            self.k.seg_sumsq_partial,
            t.norm_blocks as u32,
            BLOCK,
            &mut [arg(&table), arg(&nseg), arg(&partial.ptr())],
        )?;
        gpu.launch(
            self.k.seg_norm_finish,
            1,
            BLOCK,
            &mut [arg(&table), arg(&nseg), arg(&partial.ptr()), arg(&out)],
        )
    }

    /// AdamW over every segment in one launch, with the constants `with` / `without` (the
    /// nine words of [`AdamWParams::device_words`], by each segment's decay flag) read from
    /// device memory; each gradient multiplied by `scale[0]` first where `scale` is not 0
    /// (the clip factor: the same bits as scaling the gradients in place before the
    /// update); nothing where `apply` is not 0 and `apply[0]` is 0. Per element the f32
    /// operations of [`Ops::adamw`] (bf16 moments as there); a segment's bf16 copy (where its address is not 0)
    /// gets the updated parameter rounded as the tensor module's cast rounds it.
    ///
    /// # Safety
    /// `table` must hold `t`'s words, each address a live buffer of its segment's `n`
    /// elements (parameter and gradient f32, moments of the segment's type, a copy bf16), parameters, moments and copies not overlapping anything
    /// else in the table;
    /// `with` / `without` nine words each; `scale` / `apply` one f32 each where not 0.
    pub unsafe fn adamw_segments(
        &self,
        gpu: &Gpu,
        table: u64,
        t: &SegmentTable,
        (with, without): (u64, u64),
        scale: u64,
        apply: u64,
    ) -> Result<()> {
        let nseg = t.segments as i32;
        gpu.launch(
            self.k.adamw_segments,
            t.adamw_blocks as u32,
            BLOCK,
            &mut [
                arg(&table),
                arg(&nseg),
                arg(&with),
                arg(&without),
                arg(&scale),
                arg(&apply),
            ],
        )
    }
}
