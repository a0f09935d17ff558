//! Causal scaled-dot-product attention as cuDNN operation graphs (the pattern cuDNN's
//! fused flash-attention engines recognise; the same graphs cuDNN's C++ frontend builds
//! for `sdpa` / `sdpa_backward` on cuDNN < 9.21):
//!
//! forward  `S = Q Kᵀ · scale`, causal mask (row ≥ col, else −∞),
//!          `stats = max + log Σ exp(S − max)` (f32, per row), `P = exp(S − max) / Σ`,
//!          `O = P V`;
//! backward `Δ = rowsum(dO ⊙ O)`, `P = exp(S − stats)`, `dV = Pᵀ dO`,
//!          `dS = scale · P ⊙ (dO Vᵀ − Δ)`, `dK = dSᵀ Q`, `dQ = dS K`.
//!
//! The backward has two algorithms ([`CudnnSdpa::set_deterministic`]): deterministic (the
//! default; `dQ` is the graph's direct output, which cuDNN computes with its dP-workspace
//! algorithm, bitwise repeatable) and atomic (`dQ` through a non-virtual f32 accumulator in
//! the workspace, the frontend's signal for cuDNN's atomic-add algorithm: faster, but the
//! order of the additions and so the bits of `dQ` vary run to run).
//!
//! q, o and their gradients are bf16 with `B·H·T` rows of `D`, k, v and theirs `B·HKV·T`
//! rows, heads-major `[B, H, T, D]` or sequence-major `[B, T, H, D]` ([`SdpaLayout`]; the
//! graph's tensors carry the strides, no copy); grouped-query: dK and dV are summed over
//! each KV head's query heads inside the graph. `stats` is f32 `[B, H, T]`: the natural log
//! of each query row's sum of exponentials of the scaled, masked scores — the same saved
//! state as megamoe's own flash kernel.

use std::ffi::c_void;

use super::graph::{packed, Builder, DataType, Plan, Pw, Reduce, T};
use super::{version, Handle};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::ops::{need, positive};
use crate::pool::DeviceMem;

/// Where the rows of q, k, v, o and their gradients lie in memory (cuDNN reads any strides;
/// the head dim is always contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SdpaLayout {
    /// `[batch, heads, seq, head_dim]` row-major: each head's rows contiguous.
    HeadsMajor,
    /// `[batch, seq, heads, head_dim]` row-major: each position's heads contiguous — the
    /// `[B·T, heads·D]` output of a q/k/v projection as it is, and the input of the output
    /// projection (no layout copy around attention).
    SeqMajor,
    /// q, k, v (and dq, dk, dv) are the head blocks of one fused q|k|v projection
    /// `[batch, seq, heads + 2·kv_heads, head_dim]`: each position's query heads, then its
    /// keys, then its values (q, k and v are addresses inside it, each row
    /// `(heads + 2·kv_heads)·head_dim` elements after the previous one); o and d_o are
    /// sequence-major `[batch, seq, heads, head_dim]`.
    Packed,
}

/// Sizes of one attention call: q, o and dq hold `batch·heads·seq` rows of `head_dim`, k,
/// v, dk and dv `batch·kv_heads·seq` (arranged as `layout` says); query head `h` reads KV
/// head `h / (heads / kv_heads)` (grouped-query attention; `kv_heads == heads` is plain
/// multi-head).
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
    /// Memory layout of the q/k/v-shaped tensors.
    pub layout: SdpaLayout,
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

    /// Heads per position of the fused q|k|v rows ([`SdpaLayout::Packed`]).
    fn packed_heads(&self) -> usize {
        self.heads + 2 * self.kv_heads
    }

    /// Dims `[B, heads, T, D]` and strides (per [`SdpaLayout`]) of a tensor of `heads` heads
    /// (`qkv`: one of the fused q|k|v blocks, as opposed to o and d_o).
    fn tensor(&self, heads: usize, qkv: bool) -> ([i64; 4], [i64; 4]) {
        let [b, h, t, d] = [self.batch, heads, self.seq, self.head_dim].map(|x| x as i64);
        let dims = [b, h, t, d];
        match self.layout {
            SdpaLayout::HeadsMajor => (dims, packed(dims)),
            SdpaLayout::Packed if qkv => {
                let w = self.packed_heads() as i64 * d;
                (dims, [t * w, d, w, 1])
            }
            SdpaLayout::SeqMajor | SdpaLayout::Packed => (dims, [t * h * d, d, h * d, 1]),
        }
    }

    /// q, dq.
    fn q(&self) -> ([i64; 4], [i64; 4]) {
        self.tensor(self.heads, true)
    }

    /// o, d_o.
    fn o(&self) -> ([i64; 4], [i64; 4]) {
        self.tensor(self.heads, false)
    }

    /// k, v, dk, dv.
    fn kv(&self) -> ([i64; 4], [i64; 4]) {
        self.tensor(self.kv_heads, true)
    }

    /// Elements from the first to past the last one a q-block (`heads`) or k/v-block
    /// (`kv_heads`) tensor touches: its element count, or for [`SdpaLayout::Packed`] the
    /// span of its strided rows inside the fused buffer.
    fn extent(&self, heads: usize) -> usize {
        let n = self.batch * heads * self.seq * self.head_dim;
        match self.layout {
            SdpaLayout::Packed if n > 0 => {
                let rows = self.batch * self.seq;
                (rows - 1) * self.packed_heads() * self.head_dim + heads * self.head_dim
            }
            _ => n,
        }
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
    let index = |g: &mut Builder, axis| -> Result<T> {
        let i = g.virt(d, st, I32)?;
        g.pointwise(
            Pw::CUDNN_POINTWISE_GEN_INDEX,
            F32,
            Some(axis),
            s,
            None,
            None,
            i,
        )?;
        Ok(i)
    };
    let (row, col) = (index(g, 2)?, index(g, 3)?);
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

/// The tensors both graphs start from: q, kᵀ (a transposed view of k), the stats and
/// the scalars `scale`, `−∞`, plus the dims of the scores and of one row each.
struct Common {
    q: T,
    kt: T,
    stats: T,
    scale: T,
    neg_inf: T,
    /// `[B, H, T, T]`.
    scores: [i64; 4],
    /// `[B, H, T, 1]`.
    rows: [i64; 4],
}

fn common(g: &mut Builder, s: SdpaShape, uids: [i64; 5]) -> Result<Common> {
    let [q_uid, k_uid, stats_uid, scale_uid, neg_inf_uid] = uids;
    let ((qd, qs), (kd, ks)) = (s.q(), s.kv());
    let (b, nh, t) = (qd[0], qd[1], qd[2]);
    let rows = [b, nh, t, 1];
    Ok(Common {
        q: g.real(q_uid, qd, qs, BF16)?,
        kt: g.real(k_uid, swap_last(kd), swap_last(ks), BF16)?,
        stats: g.real(stats_uid, rows, packed(rows), F32)?,
        scale: g.scalar(scale_uid)?,
        neg_inf: g.scalar(neg_inf_uid)?,
        scores: [b, nh, t, t],
        rows,
    })
}

fn forward_plan(h: &Handle, s: SdpaShape) -> Result<Plan> {
    let mut g = Builder::new(FIRST_VIRTUAL);
    let c = common(&mut g, s, [F_Q, F_K, F_STATS, F_SCALE, F_NEG_INF])?;
    let ((od, os), (kd, ks)) = (s.o(), s.kv());
    let v = g.real(F_V, kd, ks, BF16)?;
    let o = g.real(F_O, od, os, BF16)?;
    let (sd, rd) = (c.scores, c.rows);
    let s0 = g.virt(sd, packed(sd), F32)?;
    g.matmul(c.q, c.kt, s0)?;
    let s1 = g.apply(Pw::CUDNN_POINTWISE_MUL, s0, Some(c.scale), s0)?;
    let s2 = causal_mask(&mut g, s1, c.neg_inf)?;
    let max = g.virt(rd, packed(rd), F32)?;
    g.reduction(Reduce::CUDNN_REDUCE_TENSOR_MAX, s2, max)?;
    let centred = g.apply(Pw::CUDNN_POINTWISE_SUB, s2, Some(max), s2)?;
    let e = g.apply(Pw::CUDNN_POINTWISE_EXP, centred, None, s2)?;
    let sum = g.virt(rd, packed(rd), F32)?;
    g.reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, e, sum)?;
    let log_sum = g.apply(Pw::CUDNN_POINTWISE_LOG, sum, None, sum)?;
    g.pointwise(
        Pw::CUDNN_POINTWISE_ADD,
        F32,
        None,
        max,
        Some(log_sum),
        None,
        c.stats,
    )?;
    let p = g.virt(sd, packed(sd), BF16)?;
    g.pointwise(Pw::CUDNN_POINTWISE_DIV, F32, None, e, Some(sum), None, p)?;
    g.matmul(p, v, o)?;
    g.plan(h, "attention forward")
}

/// `out = xᵀ · y` per query head (`xt` the `[B, H, T, T]` transposed view of `x`), summed
/// over each KV head's query heads into `out` when the heads are grouped.
fn grouped_product(g: &mut Builder, s: SdpaShape, x: T, y: T, out: T) -> Result<()> {
    let sd = x.dims;
    let xt = g.virt(swap_last(sd), swap_last(packed(sd)), BF16)?;
    g.reshape(x, xt)?;
    if s.kv_heads == s.heads {
        return g.matmul(xt, y, out);
    }
    let qd = s.q().0;
    let full = g.virt(qd, packed(qd), BF16)?;
    g.matmul(xt, y, full)?;
    g.reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, full, out)
}

/// The backward graph; `deterministic` computes dQ = dS K straight into dq (cuDNN's
/// workspace algorithm, bitwise repeatable), else through an f32 accumulator real tensor,
/// which cuDNN fills with atomic adds (faster, the summation order varies run to run).
fn backward_plan(h: &Handle, s: SdpaShape, deterministic: bool) -> Result<Plan> {
    let mut g = Builder::new(FIRST_VIRTUAL);
    let c = common(&mut g, s, [B_Q, B_K, B_STATS, B_SCALE, B_NEG_INF])?;
    let ((qd, qs), (kd, ks)) = (s.q(), s.kv());
    let (od, os) = s.o();
    let vt = g.real(B_V, swap_last(kd), swap_last(ks), BF16)?;
    let o = g.real(B_O, od, os, BF16)?;
    let d_o = g.real(B_DO, od, os, BF16)?;
    let one = g.scalar(B_ONE)?;
    let dq = g.real(B_DQ, qd, qs, BF16)?;
    let dk = g.real(B_DK, kd, ks, BF16)?;
    let dv = g.real(B_DV, kd, ks, BF16)?;
    let (sd, rd) = (c.scores, c.rows);
    // Δ = rowsum(dO ⊙ O), kept in the workspace
    let prod = g.apply(Pw::CUDNN_POINTWISE_MUL, d_o, Some(o), d_o)?;
    let dot = g.virt(rd, packed(rd), F32)?;
    g.reduction(Reduce::CUDNN_REDUCE_TENSOR_ADD, prod, dot)?;
    let row_dot = g.real(B_ROW_DOT, rd, packed(rd), F32)?;
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
    let s0 = g.virt(sd, packed(sd), F32)?;
    g.matmul(c.q, c.kt, s0)?;
    let s1 = g.apply(Pw::CUDNN_POINTWISE_MUL, s0, Some(c.scale), s0)?;
    let s2 = g.apply(Pw::CUDNN_POINTWISE_SUB, s1, Some(c.stats), s0)?;
    let s3 = causal_mask(&mut g, s2, c.neg_inf)?;
    let p = g.apply(Pw::CUDNN_POINTWISE_EXP, s3, None, s0)?;
    // dV = Pᵀ dO
    grouped_product(&mut g, s, p, d_o, dv)?;
    // dS = scale · P ⊙ (dO Vᵀ − Δ)
    let dp = g.virt(sd, packed(sd), F32)?;
    g.matmul(d_o, vt, dp)?;
    let centred = g.apply(Pw::CUDNN_POINTWISE_SUB, dp, Some(row_dot), s0)?;
    let ds0 = g.apply(Pw::CUDNN_POINTWISE_MUL, centred, Some(p), s0)?;
    let ds = g.apply(Pw::CUDNN_POINTWISE_MUL, ds0, Some(c.scale), s0)?;
    // dK = dSᵀ Q
    grouped_product(&mut g, s, ds, c.q, dk)?;
    // dQ = dS K
    let k = g.virt(kd, ks, BF16)?;
    g.reshape(c.kt, k)?;
    if deterministic {
        g.matmul(ds, k, dq)?;
    } else {
        let dq_acc = g.real(B_DQ_ACC, qd, packed(qd), F32)?;
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
    }
    g.plan(h, "attention backward")
}

/// Rounds a byte offset up to 256.
fn align(x: usize) -> usize {
    x.div_ceil(256) * 256
}

/// cuDNN's fused causal attention, forward and backward, with the plans built so far
/// (one per shape and direction, and per backward algorithm).
pub struct CudnnSdpa {
    handle: Handle,
    fwd: Vec<(SdpaShape, Plan)>,
    bwd: Vec<((SdpaShape, bool), Plan)>,
    version: usize,
    deterministic: bool,
}

// SAFETY: the handle and descriptors are used by one thread at a time (callers hold the
// engine's lock) with the GPU's context current.
unsafe impl Send for CudnnSdpa {}
unsafe impl Sync for CudnnSdpa {}

impl CudnnSdpa {
    /// A cuDNN handle on the GPU's stream, deterministic backward. [`Error::NoCudnn`] where
    /// libcudnn cannot be loaded.
    pub fn new(gpu: &Gpu) -> Result<CudnnSdpa> {
        let handle = Handle::new(gpu.stream())?;
        Ok(CudnnSdpa {
            handle,
            fwd: Vec::new(),
            bwd: Vec::new(),
            version: version(),
            deterministic: true,
        })
    }

    /// The loaded cuDNN version (major·10000 + minor·100 + patch).
    pub fn version(&self) -> usize {
        self.version
    }

    /// Chooses the backward algorithm: deterministic (the default: dQ written by one
    /// reduction per tile, bitwise repeatable) or dQ accumulated with atomic adds in an f32
    /// workspace (the summation order, and so the bits, vary run to run).
    pub fn set_deterministic(&mut self, on: bool) {
        self.deterministic = on;
    }

    /// Whether the backward is the deterministic algorithm.
    pub fn deterministic(&self) -> bool {
        self.deterministic
    }

    /// The index of `s`'s forward plan, built on first use.
    fn forward_index(&mut self, s: SdpaShape) -> Result<usize> {
        if let Some(i) = self.fwd.iter().position(|(k, _)| *k == s) {
            return Ok(i);
        }
        let p = forward_plan(&self.handle, s)?;
        self.fwd.push((s, p));
        Ok(self.fwd.len() - 1)
    }

    /// The index of `s`'s backward plan (current algorithm), built on first use.
    fn backward_index(&mut self, s: SdpaShape) -> Result<usize> {
        let key = (s, self.deterministic);
        if let Some(i) = self.bwd.iter().position(|(k, _)| *k == key) {
            return Ok(i);
        }
        let p = backward_plan(&self.handle, s, self.deterministic)?;
        self.bwd.push((key, p));
        Ok(self.bwd.len() - 1)
    }

    /// Builds (or finds) the forward and backward plans of `s` now, so the first call does
    /// not pay for it (and a shape cuDNN cannot run is reported before training).
    pub fn prepare(&mut self, s: SdpaShape) -> Result<()> {
        s.validate()?;
        self.forward_index(s)?;
        self.backward_index(s)?;
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
        let (n, nq, nkv) = (s.elems(), s.extent(s.heads), s.extent(s.kv_heads));
        Self::check_bufs(&[
            ("cudnn attention q", q, nq),
            ("cudnn attention k", k, nkv),
            ("cudnn attention v", v, nkv),
            ("cudnn attention o", o, n),
        ])?;
        need("cudnn attention stats", stats, s.rows(), 4)?;
        let i = self.forward_index(s)?;
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
        let (n, nq, nkv) = (s.elems(), s.extent(s.heads), s.extent(s.kv_heads));
        Self::check_bufs(&[
            ("cudnn attention q", q, nq),
            ("cudnn attention k", k, nkv),
            ("cudnn attention v", v, nkv),
            ("cudnn attention o", o, n),
            ("cudnn attention d_o", d_o, n),
            ("cudnn attention dq", dq, nq),
            ("cudnn attention dk", dk, nkv),
            ("cudnn attention dv", dv, nkv),
        ])?;
        need("cudnn attention stats", stats, s.rows(), 4)?;
        let i = self.backward_index(s)?;
        let plan = &self.bwd[i].1;
        let engine_ws = plan.workspace;
        // [dq accumulator f32 (atomic algorithm only) | Δ f32 | engine workspace]
        let acc_bytes = if self.deterministic {
            0
        } else {
            align(s.elems() * 4)
        };
        let dot_bytes = align(s.rows() * 4);
        let ws = gpu.alloc(acc_bytes + dot_bytes + engine_ws.max(256))?;
        let base = ws.ptr();
        if acc_bytes > 0 {
            // SAFETY: the accumulator is the first `acc_bytes` of `ws`.
            unsafe {
                cudarc::driver::result::memset_d8_async(base, 0, acc_bytes, gpu.stream()).map_err(
                    |source| Error::Driver {
                        call: "cuMemsetD8Async",
                        source,
                    },
                )?;
            }
        }
        let mut scale = scale;
        let mut neg_inf = f32::NEG_INFINITY;
        let mut one = 1.0f32;
        let dev = |b: &dyn DeviceMem| b.ptr() as *mut c_void;
        let host = |x: &mut f32| x as *mut f32 as *mut c_void;
        let mut bindings = vec![
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
            (B_ROW_DOT, (base + acc_bytes as u64) as *mut c_void),
        ];
        if !self.deterministic {
            bindings.push((B_DQ_ACC, base as *mut c_void));
        }
        let engine = (base + (acc_bytes + dot_bytes) as u64) as *mut c_void;
        // SAFETY: every buffer was checked for the shape's size; the workspace holds the
        // accumulator, Δ and the engine's bytes; the scalars outlive the call.
        unsafe { plan.execute(&self.handle, &bindings, engine) }
    }
}
