//! Attention on the GPU, one of three paths ([`AttentionPath`]):
//! - `cudnn-sdpa`: cuDNN's fused flash attention (megamoe-cuda's [`CudnnSdpa`], backend
//!   graph API; libcudnn loaded at run time), bf16 q, k, v, o and gradients, f32
//!   log-sum-exp `[BH, T]` as the saved state, no `[T, T]` matrix in memory; its backward
//!   is cuDNN's deterministic algorithm (bitwise repeatable), or with `cudnn-sdpa-atomic`
//!   the one accumulating dQ with atomic adds (faster; not repeatable). In the
//!   sequence-major layout ([`Tensor::causal_attention_bshd`]) cuDNN reads and writes the
//!   `[B, T, heads, D]` rows in place through strides: no layout copy;
//! - `fused`: megamoe's own tensor-core kernels ([`FlashAttention`]), same state;
//! - `unfused`: `bmm`, causal softmax, `bmm` as on the CPU, with the probabilities
//!   `[BH, T, T]` as the saved state.
//!
//! The fused paths run in bf16-activation mode for head dims they support; the f32 parity
//! path is always unfused. Where cuDNN is asked for but cannot run (no libcudnn, no plan
//! for a shape), attention runs unfused and [`CudaBackend::attention_status`] says why.

use std::sync::atomic::Ordering;

use megamoe_cuda::{CudnnSdpa, FlashAttention, SdpaLayout, SdpaShape};

use super::{dev, view, CudaBackend};
use crate::backend::HostTransfer;
use crate::ops::attention::{
    bshd_backward_via_heads_major, bshd_via_heads_major, qkv_backward_via_split, repeat_kv,
    split_qkv, sum_kv, unfused_backward, unfused_forward, AttentionKernels,
};
use crate::{DType, Result, Shape, Tensor};

/// Which causal-attention implementation the CUDA backend runs in bf16-activation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AttentionPath {
    /// cuDNN's fused SDPA with its deterministic backward (falls back to `Unfused`, saying
    /// why, where cuDNN cannot run).
    CudnnSdpa = 0,
    /// megamoe's own fused kernel (FlashAttention-2 style, WMMA).
    Fused = 1,
    /// `bmm` + causal softmax + `bmm`, the `[BH, T, T]` probabilities kept.
    Unfused = 2,
    /// cuDNN's fused SDPA whose backward accumulates dQ with atomic adds: not bitwise
    /// repeatable run to run.
    CudnnSdpaAtomic = 3,
}

impl AttentionPath {
    /// The name used in `MEGAMOE_CUDA_ATTENTION` and status lines.
    pub fn name(self) -> &'static str {
        match self {
            AttentionPath::CudnnSdpa => "cudnn-sdpa",
            AttentionPath::Fused => "fused",
            AttentionPath::Unfused => "unfused",
            AttentionPath::CudnnSdpaAtomic => "cudnn-sdpa-atomic",
        }
    }

    /// Whether this is one of cuDNN's paths.
    pub fn is_cudnn(self) -> bool {
        matches!(
            self,
            AttentionPath::CudnnSdpa | AttentionPath::CudnnSdpaAtomic
        )
    }

    fn from_u8(v: u8) -> AttentionPath {
        match v {
            0 => AttentionPath::CudnnSdpa,
            1 => AttentionPath::Fused,
            3 => AttentionPath::CudnnSdpaAtomic,
            _ => AttentionPath::Unfused,
        }
    }
}

/// The path used when `MEGAMOE_CUDA_ATTENTION` does not name one: cuDNN's fused attention
/// (on the H200 4× faster than unfused at the gpu_1b shape, docs/perf.md), unfused where
/// libcudnn does not load.
const DEFAULT_PATH: AttentionPath = AttentionPath::CudnnSdpa;

/// The initial path: `MEGAMOE_CUDA_ATTENTION=cudnn|cudnn-atomic|fused|unfused`, else
/// [`DEFAULT_PATH`].
pub(crate) fn from_env() -> AttentionPath {
    match std::env::var("MEGAMOE_CUDA_ATTENTION").as_deref() {
        Ok("cudnn") | Ok("cudnn-sdpa") => AttentionPath::CudnnSdpa,
        Ok("cudnn-atomic") | Ok("cudnn-sdpa-atomic") => AttentionPath::CudnnSdpaAtomic,
        Ok("fused") => AttentionPath::Fused,
        Ok("unfused") => AttentionPath::Unfused,
        _ => DEFAULT_PATH,
    }
}

/// The path that runs for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Cudnn,
    Flash,
    Unfused,
}

impl CudaBackend {
    /// Chooses the attention path for bf16-activation mode (see [`AttentionPath`]). The
    /// initial setting comes from `MEGAMOE_CUDA_ATTENTION=cudnn|cudnn-atomic|fused|unfused`
    /// when the backend opens.
    pub fn set_attention(&self, path: AttentionPath) {
        self.attention.store(path as u8, Ordering::Relaxed);
    }

    /// The attention path asked for (see [`CudaBackend::set_attention`]).
    pub fn attention(&self) -> AttentionPath {
        AttentionPath::from_u8(self.attention.load(Ordering::Relaxed))
    }

    /// One line saying which attention runs and, where it is not the one asked for, why:
    /// `cudnn-sdpa (cuDNN 91900)`, `fused`, `unfused`, `unfused (f32 activations)`,
    /// `unfused (libcudnn not found: …)`. Opens cuDNN if it was asked for.
    pub fn attention_status(&self) -> Result<String> {
        if !self.bf16_activations() {
            return Ok("unfused (f32 activations)".into());
        }
        let path = self.attention();
        if !path.is_cudnn() {
            return Ok(path.name().into());
        }
        let mut e = self.engine("attention_status")?;
        Ok(match open_cudnn(&mut e) {
            Ok(c) => format!("{} (cuDNN {})", path.name(), c.version()),
            Err(why) => format!("unfused ({why})"),
        })
    }

    /// The path one call over `bh` rows of head dim `d` takes.
    fn attention_run(&self, bh: usize, d: usize) -> Run {
        if !self.bf16_activations() {
            return Run::Unfused;
        }
        match self.attention() {
            p if p.is_cudnn() && d.is_multiple_of(8) && d <= 256 => Run::Cudnn,
            AttentionPath::Fused if FlashAttention::supports(d) && bh <= 65535 => Run::Flash,
            _ => Run::Unfused,
        }
    }

    /// `t` as a bf16 tensor whose first element is 16-byte aligned (what the fused
    /// kernels load with vector reads): itself, or a converted or copied buffer.
    fn bf16_aligned(&self, op: &'static str, t: &Tensor) -> Result<Tensor> {
        let t = if t.dtype() == DType::BF16 {
            t.clone()
        } else {
            self.to_dtype(t, DType::BF16)?
        };
        if dev(op, &t)?.ptr % 16 == 0 {
            Ok(t)
        } else {
            self.copy(&t)
        }
    }

    /// Runs `f` with the fused kernels of head dim `d` (compiled on first use).
    fn with_flash<T>(
        &self,
        op: &'static str,
        d: usize,
        f: impl FnOnce(&FlashAttention, &megamoe_cuda::Gpu) -> megamoe_cuda::Result<T>,
    ) -> Result<T> {
        let mut e = self.engine(op)?;
        let e = &mut *e;
        if !e.flash.iter().any(|k| k.head_dim() == d) {
            let k = self.ck(op, FlashAttention::new(&mut e.gpu, d))?;
            e.flash.push(k);
        }
        let k = e.flash.iter().find(|k| k.head_dim() == d).ok_or_else(|| {
            self.err(
                op,
                megamoe_cuda::Error::invalid("head_dim", d, "no kernels"),
            )
        })?;
        self.ck(op, f(k, &e.gpu))
    }

    /// Runs `f` with cuDNN (opened on first use; backward algorithm as the path asks), or
    /// returns why cuDNN is unavailable.
    fn with_cudnn<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut CudnnSdpa, &megamoe_cuda::Gpu) -> megamoe_cuda::Result<T>,
    ) -> Result<std::result::Result<T, String>> {
        let mut e = self.engine(op)?;
        let e = &mut *e;
        if let Err(why) = open_cudnn(e) {
            return Ok(Err(why));
        }
        let Some(Ok(c)) = e.cudnn.as_mut() else {
            return Ok(Err("cuDNN did not open".into()));
        };
        c.set_deterministic(self.attention() != AttentionPath::CudnnSdpaAtomic);
        match f(c, &e.gpu) {
            Ok(x) => Ok(Ok(x)),
            // a shape cuDNN has no engine for runs unfused, said once per process
            Err(err @ megamoe_cuda::Error::CudnnNoPlan { .. }) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| eprintln!("attention: unfused ({err})"));
                Ok(Err(err.to_string()))
            }
            Err(err) => Err(self.err(op, err)),
        }
    }

    /// bf16 outputs shaped `o_shape` and the f32 stats `[bh, t]` of a fused forward.
    fn fused_outputs(
        &self,
        op: &'static str,
        o_shape: Shape,
        bh: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor)> {
        let e = self.engine(op)?;
        let (o, _) = self.empty(&e, o_shape, DType::BF16)?;
        let (lse, _) = self.empty(&e, [bh, t].into(), DType::F32)?;
        Ok((o, lse))
    }

    /// cuDNN SDPA backward of shape `s` (heads- or sequence-major, as `s.layout` says):
    /// fresh bf16 `(dq, dk, dv)` shaped as `q`, `k`, `v`. A fused forward already ran, so a
    /// cuDNN that cannot run this backward is an error, not a fallback.
    #[allow(clippy::too_many_arguments)]
    fn cudnn_backward(
        &self,
        op: &'static str,
        s: SdpaShape,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let b = |x: &Tensor| self.bf16_aligned(op, x);
        let (qb, kb, vb, ob, gb) = (b(q)?, b(k)?, b(v)?, b(o)?, b(d_o)?);
        let lse = self.as_f32(saved)?;
        let (dq, dk, dv) = self.fused_grads(op, q, k)?;
        let ins = (view(op, &qb)?, view(op, &kb)?, view(op, &vb)?);
        let (ov, gv, lv) = (view(op, &ob)?, view(op, &gb)?, view(op, &lse)?);
        let outs = (view(op, &dq)?, view(op, &dk)?, view(op, &dv)?);
        let done = self.with_cudnn(op, |c, gpu| {
            c.backward(
                gpu,
                s,
                (&ins.0, &ins.1, &ins.2),
                &ov,
                &gv,
                &lv,
                (&outs.0, &outs.1, &outs.2),
                scale,
            )
        })?;
        match done {
            Ok(()) => Ok((dq, dk, dv)),
            Err(why) => Err(crate::Error::Cuda {
                op,
                device: q.device(),
                message: format!("cuDNN attention backward unavailable: {why}"),
            }),
        }
    }

    /// Fresh bf16 gradients shaped as `q` and `kv` (the outputs of a fused backward).
    fn fused_grads(
        &self,
        op: &'static str,
        q: &Tensor,
        kv: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let e = self.engine(op)?;
        let (dq, _) = self.empty(&e, q.shape().clone(), DType::BF16)?;
        let (dk, _) = self.empty(&e, kv.shape().clone(), DType::BF16)?;
        let (dv, _) = self.empty(&e, kv.shape().clone(), DType::BF16)?;
        Ok((dq, dk, dv))
    }
}

/// Opens cuDNN into the engine once; the error (kept) says why it cannot run.
fn open_cudnn(e: &mut super::Engine) -> std::result::Result<&mut CudnnSdpa, String> {
    if e.cudnn.is_none() {
        e.cudnn = Some(CudnnSdpa::new(&e.gpu).map_err(|err| err.to_string()));
    }
    match e.cudnn.as_mut() {
        Some(Ok(c)) => Ok(c),
        Some(Err(why)) => Err(why.clone()),
        None => Err("cuDNN did not open".into()),
    }
}

/// The cuDNN shape of `[bh, t, d]` query rows over `[bh_kv, t, d]` key/value rows: one
/// batch of `bh` query heads and `bh_kv` KV heads (query row `r` reads KV row `r / G`).
fn sdpa_shape(bh: usize, bh_kv: usize, t: usize, d: usize) -> SdpaShape {
    SdpaShape {
        batch: 1,
        heads: bh,
        kv_heads: bh_kv,
        seq: t,
        head_dim: d,
        layout: SdpaLayout::HeadsMajor,
    }
}

/// The cuDNN shape of the fused `qkv [B, T, NH + 2·NKV, D]` for `(NH, NKV)`.
fn packed_shape(qkv: &Tensor, (nh, nkv): (usize, usize)) -> SdpaShape {
    let d = qkv.dims();
    SdpaShape {
        batch: d[0],
        heads: nh,
        kv_heads: nkv,
        seq: d[1],
        head_dim: d[3],
        layout: SdpaLayout::Packed,
    }
}

/// Views of the q, k and v blocks of the fused `qkv` (bf16): each from its first element to
/// the end of the buffer (cuDNN reads their rows through the shape's strides).
fn packed_views<'a>(
    op: &'static str,
    qkv: &'a Tensor,
    (nh, nkv): (usize, usize),
) -> Result<[megamoe_cuda::DeviceView<'a>; 3]> {
    let d = dev(op, qkv)?;
    let (n, hd) = (qkv.numel(), qkv.dims()[3]);
    let at = |heads: usize| {
        let skip = heads * hd;
        // SAFETY: `skip` ≤ n elements into `qkv`'s live range, which `qkv` (borrowed for
        // 'a) keeps alive; the view ends where `qkv` ends.
        unsafe { megamoe_cuda::DeviceView::from_raw(d.ptr + (skip * 2) as u64, (n - skip) * 2) }
    };
    Ok([at(0), at(nh), at(nh + nkv)])
}

/// The cuDNN shape of sequence-major `q [B, T, NH, D]` over `k [B, T, NKV, D]`.
fn bshd_shape(q: &Tensor, k: &Tensor) -> SdpaShape {
    let (qd, kd) = (q.dims(), k.dims());
    SdpaShape {
        batch: qd[0],
        heads: qd[2],
        kv_heads: kd[2],
        seq: qd[1],
        head_dim: qd[3],
        layout: SdpaLayout::SeqMajor,
    }
}

impl AttentionKernels for CudaBackend {
    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "causal_attention";
        let (bh, t, d) = q.dims3()?;
        let bh_kv = k.dims()[0];
        let run = self.attention_run(bh, d);
        if run == Run::Unfused || t == 0 {
            return unfused_forward(q, k, v, scale);
        }
        // cuDNN reads the KV heads directly; the own kernel needs them repeated
        let group = if run == Run::Cudnn { 1 } else { bh / bh_kv };
        let (qb, kb, vb) = (
            self.bf16_aligned(OP, q)?,
            self.bf16_aligned(OP, &repeat_kv(k, group)?)?,
            self.bf16_aligned(OP, &repeat_kv(v, group)?)?,
        );
        let (o, lse) = self.fused_outputs(OP, q.shape().clone(), bh, t)?;
        let v_ = (
            view(OP, &qb)?,
            view(OP, &kb)?,
            view(OP, &vb)?,
            view(OP, &o)?,
            view(OP, &lse)?,
        );
        if run == Run::Cudnn {
            let s = sdpa_shape(bh, bh_kv, t, d);
            let done = self.with_cudnn(OP, |c, gpu| {
                c.forward(gpu, s, (&v_.0, &v_.1, &v_.2), &v_.3, &v_.4, scale)
            })?;
            return match done {
                Ok(()) => Ok((o, lse)),
                // no libcudnn (the status line names it) or no plan (said once)
                Err(_) => unfused_forward(q, k, v, scale),
            };
        }
        self.with_flash(OP, d, |f, gpu| {
            f.forward(gpu, &v_.0, &v_.1, &v_.2, &v_.3, &v_.4, (bh, t), scale)
        })?;
        Ok((o, lse))
    }

    fn causal_attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "causal_attention_backward";
        let (bh, t, d) = q.dims3()?;
        // The saved state says which forward ran: probabilities [BH, T, T] (unfused) or
        // the log-sum-exp [BH, T] (cuDNN or the own fused kernel: the same quantity).
        if saved.rank() == 3 {
            return unfused_backward(q, k, v, saved, d_o, scale);
        }
        let bh_kv = k.dims()[0];
        if self.attention_run(bh, d) == Run::Cudnn {
            // cuDNN reads the KV heads directly
            let s = sdpa_shape(bh, bh_kv, t, d);
            return self.cudnn_backward(OP, s, (q, k, v), o, saved, d_o, scale);
        }
        // the own kernel needs the KV heads repeated
        let group = bh / bh_kv;
        let (k, v) = (&repeat_kv(k, group)?, &repeat_kv(v, group)?);
        let b = |x: &Tensor| self.bf16_aligned(OP, x);
        let (qb, kb, vb, ob, gb) = (b(q)?, b(k)?, b(v)?, b(o)?, b(d_o)?);
        let lse = self.as_f32(saved)?;
        let (dq, dk, dv) = self.fused_grads(OP, q, k)?;
        let ins = (view(OP, &qb)?, view(OP, &kb)?, view(OP, &vb)?);
        let (ov, gv, lv) = (view(OP, &ob)?, view(OP, &gb)?, view(OP, &lse)?);
        let outs = (view(OP, &dq)?, view(OP, &dk)?, view(OP, &dv)?);
        self.with_flash(OP, d, |f, gpu| {
            f.backward(
                gpu,
                (&ins.0, &ins.1, &ins.2),
                &ov,
                &gv,
                &lv,
                (&outs.0, &outs.1, &outs.2),
                (bh, t),
                scale,
            )
        })?;
        Ok((dq, sum_kv(&dk, group)?, sum_kv(&dv, group)?))
    }

    fn causal_attention_bshd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "causal_attention_bshd";
        let s = bshd_shape(q, k);
        let bh = s.batch * s.heads;
        if s.seq == 0 || self.attention_run(bh, s.head_dim) != Run::Cudnn {
            return bshd_via_heads_major(self, q, k, v, scale);
        }
        let b = |x: &Tensor| self.bf16_aligned(OP, x);
        let (qb, kb, vb) = (b(q)?, b(k)?, b(v)?);
        let (o, lse) = self.fused_outputs(OP, q.shape().clone(), bh, s.seq)?;
        let (qv, kv, vv) = (view(OP, &qb)?, view(OP, &kb)?, view(OP, &vb)?);
        let (ov, lv) = (view(OP, &o)?, view(OP, &lse)?);
        let done = self.with_cudnn(OP, |c, gpu| {
            c.forward(gpu, s, (&qv, &kv, &vv), &ov, &lv, scale)
        })?;
        match done {
            Ok(()) => Ok((o, lse)),
            // no libcudnn or no plan: through the heads-major op (which says why)
            Err(_) => bshd_via_heads_major(self, q, k, v, scale),
        }
    }

    fn causal_attention_bshd_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "causal_attention_bshd_backward";
        let s = bshd_shape(q, k);
        // probabilities (unfused forward) or another path: through the heads-major op
        let cudnn = self.attention_run(s.batch * s.heads, s.head_dim) == Run::Cudnn;
        if saved.rank() == 3 || s.seq == 0 || !cudnn {
            return bshd_backward_via_heads_major(self, q, k, v, o, saved, d_o, scale);
        }
        self.cudnn_backward(OP, s, (q, k, v), o, saved, d_o, scale)
    }

    fn causal_attention_qkv(
        &self,
        qkv: &Tensor,
        heads: (usize, usize),
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "causal_attention_qkv";
        let s = packed_shape(qkv, heads);
        let bh = s.batch * s.heads;
        let split = |()| {
            let (q, k, v) = split_qkv(qkv, heads)?;
            self.causal_attention_bshd(&q, &k, &v, scale)
        };
        if s.seq == 0 || self.attention_run(bh, s.head_dim) != Run::Cudnn {
            return split(());
        }
        let qkvb = self.bf16_aligned(OP, qkv)?;
        let o_shape = [s.batch, s.seq, s.heads, s.head_dim].into();
        let (o, lse) = self.fused_outputs(OP, o_shape, bh, s.seq)?;
        let [qv, kv, vv] = packed_views(OP, &qkvb, heads)?;
        let (ov, lv) = (view(OP, &o)?, view(OP, &lse)?);
        let done = self.with_cudnn(OP, |c, gpu| {
            c.forward(gpu, s, (&qv, &kv, &vv), &ov, &lv, scale)
        })?;
        match done {
            Ok(()) => Ok((o, lse)),
            // no libcudnn or no plan for the strided rows: on copied-out q, k, v
            Err(_) => split(()),
        }
    }

    fn causal_attention_qkv_backward(
        &self,
        qkv: &Tensor,
        (o, saved, d_o): (&Tensor, &Tensor, &Tensor),
        heads: (usize, usize),
        scale: f32,
    ) -> Result<Tensor> {
        const OP: &str = "causal_attention_qkv_backward";
        let s = packed_shape(qkv, heads);
        let cudnn = self.attention_run(s.batch * s.heads, s.head_dim) == Run::Cudnn;
        if saved.rank() == 3 || s.seq == 0 || !cudnn {
            return qkv_backward_via_split(self, qkv, (o, saved, d_o), heads, scale);
        }
        let b = |x: &Tensor| self.bf16_aligned(OP, x);
        let (qkvb, ob, gb) = (b(qkv)?, b(o)?, b(d_o)?);
        let lse = self.as_f32(saved)?;
        let e = self.engine(OP)?;
        let (d_qkv, _) = self.empty(&e, qkv.shape().clone(), DType::BF16)?;
        drop(e);
        let [qv, kv, vv] = packed_views(OP, &qkvb, heads)?;
        let [dqv, dkv, dvv] = packed_views(OP, &d_qkv, heads)?;
        let (ov, gv, lv) = (view(OP, &ob)?, view(OP, &gb)?, view(OP, &lse)?);
        let done = self.with_cudnn(OP, |c, gpu| {
            c.backward(
                gpu,
                s,
                (&qv, &kv, &vv),
                &ov,
                &gv,
                &lv,
                (&dqv, &dkv, &dvv),
                scale,
            )
        })?;
        match done {
            // dq, dk and dv fill their head blocks: every element of d_qkv
            Ok(()) => Ok(d_qkv),
            // no plan for the strided rows: on copied-out q, k, v (the same saved state)
            Err(_) => qkv_backward_via_split(self, qkv, (o, saved, d_o), heads, scale),
        }
    }
}
