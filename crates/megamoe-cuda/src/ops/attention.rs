//! Causal grouped-query attention on cuBLAS: `S = Q Kᵀ` (strided-batched GEMM, f32
//! output), `P = causal_softmax(scale · S)` (one kernel, stored in the storage type for the
//! backward), `O = P V`; the backward of all of it.
//!
//! Layout: `q, o [B, NH, T, D]`, `k, v [B, NKV, T, D]` (heads-major: megamoe-tensor's
//! `Tensor::causal_attention` layout). Query head `h` reads KV head `h / (NH / NKV)`, so
//! the `rep = NH / NKV`
//! query heads of one KV head are `rep·T` contiguous rows: every product is one GEMM per
//! (sequence, KV head), batched, with no repeated copy of K or V; the backward's `dK` and
//! `dV` sum over the group inside the GEMM's reduction. Memory is O(T²) per head (the
//! correct path; a fused flash kernel is the fast one).

use super::{int, need, positive, Ops, BLOCK};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};
use crate::gemm::{Elem, Operand};
use crate::pool::DeviceMem;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// B: sequences.
    pub batch: usize,
    /// NH: query heads.
    pub heads: usize,
    /// NKV: key/value heads (divides NH).
    pub kv_heads: usize,
    /// T: sequence length.
    pub seq: usize,
    /// D: head dimension.
    pub head_dim: usize,
}

impl AttentionShape {
    fn validate(&self) -> Result<()> {
        positive("attention batch", self.batch)?;
        positive("attention heads", self.heads)?;
        positive("attention kv_heads", self.kv_heads)?;
        positive("attention seq", self.seq)?;
        positive("attention head_dim", self.head_dim)?;
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::invalid(
                "attention kv_heads",
                self.kv_heads,
                "must divide heads",
            ));
        }
        int("attention rows", self.batch * self.heads * self.seq)?;
        Ok(())
    }

    /// Elements of `q` / `o`.
    pub fn q_elems(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }

    /// Elements of `k` / `v`.
    pub fn kv_elems(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }

    /// Elements of the saved probabilities `[B·NH, T, T]`.
    pub fn probs_elems(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }

    /// FLOPs of the forward's two GEMMs as computed (full T×T, not causal-halved).
    pub fn forward_flops(&self) -> f64 {
        4.0 * (self.batch * self.heads) as f64 * (self.seq * self.seq * self.head_dim) as f64
    }
}

/// Gradients of one attention backward (storage type).
pub struct AttentionGrads<'a> {
    /// d q `[B, NH, T, D]`.
    pub dq: &'a dyn DeviceMem,
    /// d k `[B, NKV, T, D]`.
    pub dk: &'a dyn DeviceMem,
    /// d v `[B, NKV, T, D]`.
    pub dv: &'a dyn DeviceMem,
}

/// (rep·T, groups) and the operand makers of one shape.
struct Plan {
    s: AttentionShape,
    rep_t: usize,
    groups: usize,
}

impl Plan {
    fn new(s: AttentionShape) -> Plan {
        Plan {
            s,
            rep_t: s.heads / s.kv_heads * s.seq,
            groups: s.batch * s.kv_heads,
        }
    }
    /// A `[rep·T, D]` per-group matrix (q, o, dq, do).
    fn qd(&self, b: &dyn DeviceMem, e: Elem) -> Operand {
        Operand::dense(b.ptr(), e, self.s.head_dim, self.rep_t * self.s.head_dim)
    }
    /// A `[T, D]` per-group matrix (k, v, dk, dv).
    fn kv(&self, b: &dyn DeviceMem, e: Elem) -> Operand {
        Operand::dense(b.ptr(), e, self.s.head_dim, self.s.seq * self.s.head_dim)
    }
    /// A `[rep·T, T]` per-group matrix (scores, probs).
    fn tt(&self, b: &dyn DeviceMem, e: Elem) -> Operand {
        Operand::dense(b.ptr(), e, self.s.seq, self.rep_t * self.s.seq)
    }
}

impl Ops {
    fn check_attention(
        &self,
        s: &AttentionShape,
        bufs: &[(&'static str, &dyn DeviceMem, usize)],
    ) -> Result<()> {
        s.validate()?;
        for &(what, b, n) in bufs {
            need(what, b, n, self.elem.size())?;
        }
        Ok(())
    }

    /// Causal attention forward: `o = softmax(scale · q kᵀ, causal) v`; the probabilities
    /// are written to `probs [B·NH, T, T]` for the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        gpu: &Gpu,
        s: AttentionShape,
        q: &dyn DeviceMem,
        k: &dyn DeviceMem,
        v: &dyn DeviceMem,
        o: &dyn DeviceMem,
        probs: &dyn DeviceMem,
        scale: f32,
    ) -> Result<()> {
        self.check_attention(
            &s,
            &[
                ("attention q", q, s.q_elems()),
                ("attention k", k, s.kv_elems()),
                ("attention v", v, s.kv_elems()),
                ("attention o", o, s.q_elems()),
                ("attention probs", probs, s.probs_elems()),
            ],
        )?;
        let e = self.elem;
        let p = Plan::new(s);
        let scores = gpu.alloc(s.probs_elems() * 4)?;
        let (t, d) = (s.seq, s.head_dim);
        gpu.gemm(
            p.rep_t,
            t,
            d,
            p.qd(q, e),
            p.kv(k, e).t(),
            p.tt(&scores, Elem::F32),
            p.groups,
            1.0,
            0.0,
        )?;
        self.causal_softmax(gpu, &scores, probs, s.batch * s.heads * t, t, scale)?;
        gpu.gemm(
            p.rep_t,
            d,
            t,
            p.tt(probs, e),
            p.kv(v, e),
            p.qd(o, e),
            p.groups,
            1.0,
            0.0,
        )
    }

    /// Causal attention backward from `d_o` and the forward's `q, k, v, probs`: writes
    /// `dq`, `dk`, `dv` fresh.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        gpu: &Gpu,
        s: AttentionShape,
        d_o: &dyn DeviceMem,
        q: &dyn DeviceMem,
        k: &dyn DeviceMem,
        v: &dyn DeviceMem,
        probs: &dyn DeviceMem,
        grads: AttentionGrads<'_>,
        scale: f32,
    ) -> Result<()> {
        self.check_attention(
            &s,
            &[
                ("attention d_o", d_o, s.q_elems()),
                ("attention q", q, s.q_elems()),
                ("attention k", k, s.kv_elems()),
                ("attention v", v, s.kv_elems()),
                ("attention probs", probs, s.probs_elems()),
                ("attention dq", grads.dq, s.q_elems()),
                ("attention dk", grads.dk, s.kv_elems()),
                ("attention dv", grads.dv, s.kv_elems()),
            ],
        )?;
        let e = self.elem;
        let p = Plan::new(s);
        let (t, d) = (s.seq, s.head_dim);
        // dV = Pᵀ dO
        gpu.gemm(
            t,
            d,
            p.rep_t,
            p.tt(probs, e).t(),
            p.qd(d_o, e),
            p.kv(grads.dv, e),
            p.groups,
            1.0,
            0.0,
        )?;
        // dP = dO Vᵀ (f32), dS = scale · P ⊙ (dP − ⟨P, dP⟩)
        let d_p = gpu.alloc(s.probs_elems() * 4)?;
        gpu.gemm(
            p.rep_t,
            t,
            d,
            p.qd(d_o, e),
            p.kv(v, e).t(),
            p.tt(&d_p, Elem::F32),
            p.groups,
            1.0,
            0.0,
        )?;
        let d_s = gpu.alloc(s.probs_elems() * e.size())?;
        self.causal_softmax_backward(gpu, probs, &d_p, &d_s, s.batch * s.heads * t, t, scale)?;
        drop(d_p);
        // dQ = dS K, dK = dSᵀ Q
        gpu.gemm(
            p.rep_t,
            d,
            t,
            p.tt(&d_s, e),
            p.kv(k, e),
            p.qd(grads.dq, e),
            p.groups,
            1.0,
            0.0,
        )?;
        gpu.gemm(
            t,
            d,
            p.rep_t,
            p.tt(&d_s, e).t(),
            p.qd(q, e),
            p.kv(grads.dk, e),
            p.groups,
            1.0,
            0.0,
        )
    }

    /// Causal softmax of f32 scores `[rows, t]` (row `r` is query position `r mod t`, it
    /// sees keys `0..=r mod t`) into `probs` (storage type): `softmax(scale · x)`, 0 above
    /// the diagonal.
    pub fn causal_softmax(
        &self,
        gpu: &Gpu,
        scores: &dyn DeviceMem,
        probs: &dyn DeviceMem,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        positive("causal_softmax rows", rows)?;
        positive("causal_softmax t", t)?;
        need("causal_softmax scores", scores, rows * t, 4)?;
        need("causal_softmax probs", probs, rows * t, self.elem.size())?;
        let ti = int("causal_softmax t", t)?;
        unsafe {
            gpu.launch(
                self.k.causal_softmax_fwd,
                int("causal_softmax rows", rows)? as u32,
                BLOCK,
                &mut [arg(&scores.ptr()), arg(&probs.ptr()), arg(&ti), arg(&scale)],
            )
        }
    }

    /// Backward of [`Ops::causal_softmax`]: `d_scores = scale · y ⊙ (dy − ⟨y, dy⟩)` from its
    /// output `y` (storage type) and `dy` (f32), written in the storage type.
    #[allow(clippy::too_many_arguments)]
    pub fn causal_softmax_backward(
        &self,
        gpu: &Gpu,
        y: &dyn DeviceMem,
        dy: &dyn DeviceMem,
        d_scores: &dyn DeviceMem,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        positive("causal_softmax rows", rows)?;
        positive("causal_softmax t", t)?;
        need("causal_softmax y", y, rows * t, self.elem.size())?;
        need("causal_softmax dy", dy, rows * t, 4)?;
        need(
            "causal_softmax d_scores",
            d_scores,
            rows * t,
            self.elem.size(),
        )?;
        let ti = int("causal_softmax t", t)?;
        unsafe {
            gpu.launch(
                self.k.causal_softmax_bwd,
                int("causal_softmax rows", rows)? as u32,
                BLOCK,
                &mut [
                    arg(&y.ptr()),
                    arg(&dy.ptr()),
                    arg(&d_scores.ptr()),
                    arg(&ti),
                    arg(&scale),
                ],
            )
        }
    }
}
