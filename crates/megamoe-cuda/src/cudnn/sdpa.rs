//! Causal scaled-dot-product attention as cuDNN operation graphs (the pattern cuDNN's
//! fused flash-attention engines recognise; the same graphs cuDNN's C++ frontend builds
//! for `sdpa` / `sdpa_backward` on cuDNN < 9.21):
//!
//! forward  `S = Q Kᵀ · scale`, causal mask (row ≥ col, else −∞),
//!          `stats = max + log Σ exp(S − max)` (f32, per row), `P = exp(S − max) / Σ`,
//!          `O = P V`;
//! backward `Δ = rowsum(dO ⊙ O)`, `P = exp(S − stats)`, `dV = Pᵀ dO`,
//!          `dS = scale · P ⊙ (dO Vᵀ − Δ)`, `dK = dSᵀ Q`, `dQ = dS K` (accumulated in an f32
//!          workspace buffer).
//!
//! q, o and their gradients are bf16 `[B, H, T, D]` (row-major), k, v and theirs `[B, HKV,
//! T, D]` (grouped-query: dK and dV are summed over each KV head's query heads inside the
//! graph), `stats` f32 `[B, H, T]`: the natural log of each query row's sum of exponentials of the scaled,
//! masked scores — the same saved state as megamoe's own flash kernel.

use std::ffi::c_void;

use super::graph::{packed, Builder, DataType, Plan, Pw, Reduce, T};
use super::{version, Handle};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::ops::{need, positive};
use crate::pool::DeviceMem;

/// Sizes of one attention call: q, o and dq `[batch, heads, seq, head_dim]`, k, v, dk and
/// dv `[batch, kv_heads, seq, head_dim]`; query head `h` reads KV head `h / (heads /
/// kv_heads)` (grouped-query attention; `kv_heads == heads` is plain multi-head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SdpaShape {
    /// B.
    pub batch: usize,
    /// H: query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// T (queries and keys).
    pub seq: usize,
    /// D.
    pub head_dim: usize,
}

impl SdpaShape {
    fn validate(&self) -> Result<()> {
        positive("cudnn attention batch", self.batch)?;
        positive("cudnn attention heads", self.heads)?;
        positive("cudnn attention seq", self.seq)?;
        positive("cudnn attention head_dim", self.head_dim)?;
        positive("cudnn attention kv_heads", self.kv_heads)?;
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::invalid(
                "cudnn attention kv_heads",
                self.kv_heads,
                "must divide heads",
            ));
        }
        if !self.head_dim.is_multiple_of(8) || self.head_dim > 256 {
            return Err(Error::invalid(
                "cudnn attention head_dim",
                self.head_dim,
                "must be a multiple of 8 up to 256 (cuDNN fused attention)",
            ));
        }
        Ok(())
    }

    /// Elements of q (and o, dq, d_o).
    pub fn elems(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }

    /// Elements of k (and v, dk, dv).
    pub fn kv_elems(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }

    /// Rows (`B·H·T`): elements of `stats`.
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    fn dims(&self) -> [i64; 4] {
        [self.batch, self.heads, self.seq, self.head_dim].map(|x| x as i64)
    }

    fn kv_dims(&self) -> [i64; 4] {
        [self.batch, self.kv_heads, self.seq, self.head_dim].map(|x| x as i64)
    }
}

// uids of the forward graph's real tensors
const F_Q: i64 = 1;
const F_K: i64 = 2;
const F_V: i64 = 3;
const F_O: i64 = 4;
const F_STATS: i64 = 5;
const F_SCALE: i64 = 6;
const F_NEG_INF: i64 = 7;
// uids of the backward graph's real tensors
const B_Q: i64 = 1;
const B_K: i64 = 2;
const B_V: i64 = 3;
const B_O: i64 = 4;
const B_DO: i64 = 5;
const B_STATS: i64 = 6;
const B_SCALE: i64 = 7;
const B_NEG_INF: i64 = 8;
const B_ONE: i64 = 9;
const B_DQ: i64 = 10;
const B_DK: i64 = 11;
const B_DV: i64 = 12;
const B_ROW_DOT: i64 = 13;
const B_DQ_ACC: i64 = 14;
/// Virtual tensors are numbered from here.
const FIRST_VIRTUAL: i64 = 100;

const BF16: DataType = DataType::CUDNN_DATA_BFLOAT16;
const F32: DataType = DataType::CUDNN_DATA_FLOAT;
const I32: DataType = DataType::CUDNN_DATA_INT32;
const BOOL: DataType = DataType::CUDNN_DATA_BOOLEAN;

/// `x` with its last two dims (and strides) swapped: a transposed view.
fn swap_last(x: [i64; 4]) -> [i64; 4] {
    [x[0], x[1], x[3], x[2]]
}

/// The masked score path shared by both graphs: `s` masked causally (row ≥ col kept,
/// else `neg_inf`), returned as a new virtual tensor.
fn causal_mask(g: &mut Builder, s: T, neg_inf: T) -> Result<T> {
    let d = s.dims;
    let st = packed(d);
    let row = g.virt(d, st, I32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_GEN_INDEX,
        F32,
        Some(2),
        s,
        None,
        None,
        row,
    )?;
    let col = g.virt(d, st, I32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_GEN_INDEX,
        F32,
        Some(3),
        s,
        None,
        None,
        col,
    )?;
    let keep = g.virt(d, st, BOOL)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_CMP_GE,
        BOOL,
        None,
        row,
        Some(col),
        None,
        keep,
    )?;
    let out = g.virt(d, st, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_BINARY_SELECT,
        F32,
        None,
        s,
        Some(neg_inf),
        Some(keep),
        out,
    )?;
    Ok(out)
}

fn forward_plan(h: &Handle, s: SdpaShape) -> Result<Plan> {
    let mut g = Builder::new(FIRST_VIRTUAL);
    let qd = s.dims();
    let qs = packed(qd);
    let (b, nh, t) = (qd[0], qd[1], qd[2]);
    let (kd, ks) = (s.kv_dims(), packed(s.kv_dims()));
    let q = g.real(F_Q, qd, qs, BF16)?;
    let kt = g.real(F_K, swap_last(kd), swap_last(ks), BF16)?;
    let v = g.real(F_V, kd, ks, BF16)?;
    let o = g.real(F_O, qd, qs, BF16)?;
    let rd = [b, nh, t, 1];
    let rs = packed(rd);
    let stats = g.real(F_STATS, rd, rs, F32)?;
    let scale = g.scalar(F_SCALE)?;
    let neg_inf = g.scalar(F_NEG_INF)?;
    let sd = [b, nh, t, t];
    let ss = packed(sd);
    let s0 = g.virt(sd, ss, F32)?;
    g.matmul(q, kt, s0)?;
    let s1 = g.virt(sd, ss, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_MUL,
        F32,
        None,
        s0,
        Some(scale),
        None,
        s1,
    )?;
    let s2 = causal_mask(&mut g, s1, neg_inf)?;
    let max = g.virt(rd, rs, F32)?;
    g.reduction(Reduce::CUDNN_REDUCE_TENSOR_MAX, s2, max)?;
    let centred = g.virt(sd, ss, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_SUB,
        F32,
        None,
        s2,
        Some(max),
        None,
        centred,
    )?;
    let e = g.virt(sd, ss, F32)?;
    g.pointwise(Pw::CUDNN_POINTWISE_EXP, F32, None, centred, None, None, e)?;
    let sum = g.virt(rd, rs, F32)?;
    g.reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, e, sum)?;
    let log_sum = g.virt(rd, rs, F32)?;
    g.pointwise(Pw::CUDNN_POINTWISE_LOG, F32, None, sum, None, None, log_sum)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_ADD,
        F32,
        None,
        max,
        Some(log_sum),
        None,
        stats,
    )?;
    let p = g.virt(sd, ss, BF16)?;
    g.pointwise(Pw::CUDNN_POINTWISE_DIV, F32, None, e, Some(sum), None, p)?;
    g.matmul(p, v, o)?;
    g.plan(h, "attention forward")
}

fn backward_plan(h: &Handle, s: SdpaShape) -> Result<Plan> {
    let mut g = Builder::new(FIRST_VIRTUAL);
    let qd = s.dims();
    let qs = packed(qd);
    let (b, nh, t) = (qd[0], qd[1], qd[2]);
    let (kd, ks) = (s.kv_dims(), packed(s.kv_dims()));
    let grouped = s.kv_heads != s.heads;
    let q = g.real(B_Q, qd, qs, BF16)?;
    let kt = g.real(B_K, swap_last(kd), swap_last(ks), BF16)?;
    let vt = g.real(B_V, swap_last(kd), swap_last(ks), BF16)?;
    let o = g.real(B_O, qd, qs, BF16)?;
    let d_o = g.real(B_DO, qd, qs, BF16)?;
    let rd = [b, nh, t, 1];
    let rs = packed(rd);
    let stats = g.real(B_STATS, rd, rs, F32)?;
    let scale = g.scalar(B_SCALE)?;
    let neg_inf = g.scalar(B_NEG_INF)?;
    let one = g.scalar(B_ONE)?;
    let dq = g.real(B_DQ, qd, qs, BF16)?;
    let dk = g.real(B_DK, kd, ks, BF16)?;
    let dv = g.real(B_DV, kd, ks, BF16)?;
    // Δ = rowsum(dO ⊙ O), kept in the workspace
    let prod = g.virt(qd, qs, F32)?;
    g.pointwise(Pw::CUDNN_POINTWISE_MUL, F32, None, d_o, Some(o), None, prod)?;
    let dot = g.virt(rd, rs, F32)?;
    g.reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, prod, dot)?;
    let row_dot = g.real(B_ROW_DOT, rd, rs, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_MUL,
        F32,
        None,
        dot,
        Some(one),
        None,
        row_dot,
    )?;
    // P = exp(scale · Q Kᵀ − stats), masked
    let sd = [b, nh, t, t];
    let ss = packed(sd);
    let s0 = g.virt(sd, ss, F32)?;
    g.matmul(q, kt, s0)?;
    let s1 = g.virt(sd, ss, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_MUL,
        F32,
        None,
        s0,
        Some(scale),
        None,
        s1,
    )?;
    let s2 = g.virt(sd, ss, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_SUB,
        F32,
        None,
        s1,
        Some(stats),
        None,
        s2,
    )?;
    let s3 = causal_mask(&mut g, s2, neg_inf)?;
    let p = g.virt(sd, ss, F32)?;
    g.pointwise(Pw::CUDNN_POINTWISE_EXP, F32, None, s3, None, None, p)?;
    // dV = Pᵀ dO
    let pt = g.virt(swap_last(sd), swap_last(ss), BF16)?;
    g.reshape(p, pt)?;
    if grouped {
        // per query head, then summed over each KV head's group
        let full = g.virt(qd, qs, BF16)?;
        g.matmul(pt, d_o, full)?;
        g.reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, full, dv)?;
    } else {
        g.matmul(pt, d_o, dv)?;
    }
    // dS = scale · P ⊙ (dO Vᵀ − Δ)
    let dp = g.virt(sd, ss, F32)?;
    g.matmul(d_o, vt, dp)?;
    let centred = g.virt(sd, ss, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_SUB,
        F32,
        None,
        dp,
        Some(row_dot),
        None,
        centred,
    )?;
    let ds0 = g.virt(sd, ss, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_MUL,
        F32,
        None,
        centred,
        Some(p),
        None,
        ds0,
    )?;
    let ds = g.virt(sd, ss, F32)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_MUL,
        F32,
        None,
        ds0,
        Some(scale),
        None,
        ds,
    )?;
    // dK = dSᵀ Q
    let dst = g.virt(swap_last(sd), swap_last(ss), BF16)?;
    g.reshape(ds, dst)?;
    if grouped {
        let full = g.virt(qd, qs, BF16)?;
        g.matmul(dst, q, full)?;
        g.reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, full, dk)?;
    } else {
        g.matmul(dst, q, dk)?;
    }
    // dQ = dS K through an f32 accumulator in the workspace
    let k = g.virt(kd, ks, BF16)?;
    g.reshape(kt, k)?;
    let dq_acc = g.real(B_DQ_ACC, qd, qs, F32)?;
    g.matmul(ds, k, dq_acc)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_IDENTITY,
        F32,
        None,
        dq_acc,
        None,
        None,
        dq,
    )?;
    g.plan(h, "attention backward")
}

/// Rounds a byte offset up to 256.
fn align(x: usize) -> usize {
    x.div_ceil(256) * 256
}

/// cuDNN's fused causal attention, forward and backward, with the plans built so far
/// (one per shape and direction).
pub struct CudnnSdpa {
    handle: Handle,
    fwd: Vec<(SdpaShape, Plan)>,
    bwd: Vec<(SdpaShape, Plan)>,
    version: usize,
}

// SAFETY: the handle and descriptors are used by one thread at a time (callers hold the
// engine's lock) with the GPU's context current.
unsafe impl Send for CudnnSdpa {}
unsafe impl Sync for CudnnSdpa {}

impl CudnnSdpa {
    /// A cuDNN handle on the GPU's stream. [`Error::NoCudnn`] where libcudnn cannot be
    /// loaded.
    pub fn new(gpu: &Gpu) -> Result<CudnnSdpa> {
        let handle = Handle::new(gpu.stream())?;
        Ok(CudnnSdpa {
            handle,
            fwd: Vec::new(),
            bwd: Vec::new(),
            version: version(),
        })
    }

    /// The loaded cuDNN version (major·10000 + minor·100 + patch).
    pub fn version(&self) -> usize {
        self.version
    }

    /// The index of `s`'s plan in the forward or backward cache, built on first use.
    fn plan(&mut self, s: SdpaShape, forward: bool) -> Result<usize> {
        let cache = if forward { &self.fwd } else { &self.bwd };
        if let Some(i) = cache.iter().position(|(k, _)| *k == s) {
            return Ok(i);
        }
        let p = if forward {
            forward_plan(&self.handle, s)?
        } else {
            backward_plan(&self.handle, s)?
        };
        let cache = if forward {
            &mut self.fwd
        } else {
            &mut self.bwd
        };
        cache.push((s, p));
        Ok(cache.len() - 1)
    }

    /// Builds (or finds) the forward and backward plans of `s` now, so the first call does
    /// not pay for it (and a shape cuDNN cannot run is reported before training).
    pub fn prepare(&mut self, s: SdpaShape) -> Result<()> {
        s.validate()?;
        self.plan(s, true)?;
        self.plan(s, false)?;
        Ok(())
    }

    /// Each buffer holds `n` bf16 elements and is 16-byte aligned.
    fn check_bufs(bufs: &[(&'static str, &dyn DeviceMem, usize)]) -> Result<()> {
        for &(what, b, n) in bufs {
            need(what, b, n, 2)?;
            if b.ptr() % 16 != 0 {
                return Err(Error::invalid(
                    "cudnn attention buffer address",
                    b.ptr(),
                    "must be 16-byte aligned",
                ));
            }
        }
        Ok(())
    }

    /// `o = softmax(scale · q kᵀ, causal) v` and `stats` (f32 `[B, H, T]`), bf16
    /// otherwise (shapes in [`SdpaShape`]). Queues work only (capturable).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        s: SdpaShape,
        (q, k, v): (&dyn DeviceMem, &dyn DeviceMem, &dyn DeviceMem),
        o: &dyn DeviceMem,
        stats: &dyn DeviceMem,
        scale: f32,
    ) -> Result<()> {
        s.validate()?;
        let (n, nkv) = (s.elems(), s.kv_elems());
        Self::check_bufs(&[
            ("cudnn attention q", q, n),
            ("cudnn attention k", k, nkv),
            ("cudnn attention v", v, nkv),
            ("cudnn attention o", o, n),
        ])?;
        need("cudnn attention stats", stats, s.rows(), 4)?;
        let i = self.plan(s, true)?;
        let plan = &self.fwd[i].1;
        let ws = gpu.alloc(plan.workspace.max(256))?;
        let mut scale = scale;
        let mut neg_inf = f32::NEG_INFINITY;
        let dev = |b: &dyn DeviceMem| b.ptr() as *mut c_void;
        let bindings = [
            (F_Q, dev(q)),
            (F_K, dev(k)),
            (F_V, dev(v)),
            (F_O, dev(o)),
            (F_STATS, dev(stats)),
            (F_SCALE, &mut scale as *mut f32 as *mut c_void),
            (F_NEG_INF, &mut neg_inf as *mut f32 as *mut c_void),
        ];
        // SAFETY: every buffer was checked for the shape's size; the scalars outlive the call.
        unsafe { plan.execute(&self.handle, &bindings, ws.ptr() as *mut c_void) }
    }

    /// Gradients `dq, dk, dv` (bf16, shapes in [`SdpaShape`], written whole) of
    /// [`CudnnSdpa::forward`] from its inputs, output `o`, `stats` and `d_o`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        gpu: &Gpu,
        s: SdpaShape,
        (q, k, v): (&dyn DeviceMem, &dyn DeviceMem, &dyn DeviceMem),
        o: &dyn DeviceMem,
        d_o: &dyn DeviceMem,
        stats: &dyn DeviceMem,
        (dq, dk, dv): (&dyn DeviceMem, &dyn DeviceMem, &dyn DeviceMem),
        scale: f32,
    ) -> Result<()> {
        s.validate()?;
        let (n, nkv) = (s.elems(), s.kv_elems());
        Self::check_bufs(&[
            ("cudnn attention q", q, n),
            ("cudnn attention k", k, nkv),
            ("cudnn attention v", v, nkv),
            ("cudnn attention o", o, n),
            ("cudnn attention d_o", d_o, n),
            ("cudnn attention dq", dq, n),
            ("cudnn attention dk", dk, nkv),
            ("cudnn attention dv", dv, nkv),
        ])?;
        need("cudnn attention stats", stats, s.rows(), 4)?;
        let i = self.plan(s, false)?;
        let plan = &self.bwd[i].1;
        let engine_ws = plan.workspace;
        // [dq accumulator f32 | Δ f32 | engine workspace]
        let acc_bytes = align(s.elems() * 4);
        let dot_bytes = align(s.rows() * 4);
        let ws = gpu.alloc(acc_bytes + dot_bytes + engine_ws.max(256))?;
        let base = ws.ptr();
        // SAFETY: the accumulator is the first `acc_bytes` of `ws`.
        unsafe {
            cudarc::driver::result::memset_d8_async(base, 0, acc_bytes, gpu.stream()).map_err(
                |source| Error::Driver {
                    call: "cuMemsetD8Async",
                    source,
                },
            )?;
        }
        let mut scale = scale;
        let mut neg_inf = f32::NEG_INFINITY;
        let mut one = 1.0f32;
        let dev = |b: &dyn DeviceMem| b.ptr() as *mut c_void;
        let host = |x: &mut f32| x as *mut f32 as *mut c_void;
        let bindings = [
            (B_Q, dev(q)),
            (B_K, dev(k)),
            (B_V, dev(v)),
            (B_O, dev(o)),
            (B_DO, dev(d_o)),
            (B_STATS, dev(stats)),
            (B_SCALE, host(&mut scale)),
            (B_NEG_INF, host(&mut neg_inf)),
            (B_ONE, host(&mut one)),
            (B_DQ, dev(dq)),
            (B_DK, dev(dk)),
            (B_DV, dev(dv)),
            (B_DQ_ACC, base as *mut c_void),
            (B_ROW_DOT, (base + acc_bytes as u64) as *mut c_void),
        ];
        let engine = (base + (acc_bytes + dot_bytes) as u64) as *mut c_void;
        // SAFETY: every buffer was checked for the shape's size; the workspace holds the
        // accumulator, Δ and the engine's bytes; the scalars outlive the call.
        unsafe { plan.execute(&self.handle, &bindings, engine) }
    }
}
