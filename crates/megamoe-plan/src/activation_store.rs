//! What megamoe's trainer keeps alive while it trains one micro-batch, tensor by tensor:
//! the activation store of each layer, the deferred weight-gradient work of the split
//! backward, the head's logits, and the largest workspaces, as the model code allocates
//! them (docs/architecture.md, "Memory model"). The planner's `activations` and
//! `moe_routing` buckets come from here.
//!
//! The trainer's order of work per micro-batch: the forward of every layer keeps its
//! [`LayerStore::saved`] state; the head keeps the logits `[N, V]` (held by the step until
//! the micro-batch ends) and ∂loss/∂logits; the input half of the backward then runs the
//! layers top to bottom, turning each layer's saved state into its deferred weight work
//! ([`LayerStore::deferred`]: inputs, outputs and gradients of every weight GEMM) which
//! stays alive until the weight half runs after the last layer. So the micro-batch's
//! peak is the largest over the layers `i` (top first) of
//! `Σ_{j<i} saved_j + saved_i + work_i + Σ_{j>i} deferred_j + head`, where `work_i` is
//! what layer `i`'s backward allocates while its saved state is still alive (the FFN's
//! or the attention's gradients and workspaces, whichever phase is larger).
//!
//! Element sizes follow the trainer's numerics: `train.dtype = "f32"` keeps everything
//! f32; `"bf16"` is the GPU's mixed precision, where activations and their gradients are
//! bf16 and the kernels that accumulate in f32 write f32 results: norms' `rstd`, router
//! and loss tensors `[N, E]`, attention `bmm` products (scores, unfused outputs and their
//! gradients), the SwiGLU backward, the GQA key/value gradient sums and the embedding
//! output (layer 0's input).

use crate::modes::{Activation, AuxLossKind, OffloadTarget, Precision, Recompute};
use crate::plan::Plan;

/// How attention runs on the device (the saved state and workspaces differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// `bmm` + causal softmax + `bmm`: saves the probabilities `[B·heads, T, T]`.
    #[default]
    Unfused,
    /// A fused kernel: saves the log-sum-exp `[B·heads, T]`, no `[T, T]` matrix
    /// (only in bf16 mixed precision on a GPU; f32 runs stay unfused).
    Fused,
}

/// Bytes one micro-batch's layer keeps and allocates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerStore {
    /// Kept from the forward to the input half of the backward.
    pub saved: f64,
    /// Of `saved`, the MoE layer's routing, dispatch and expert tensors.
    pub saved_moe: f64,
    /// Kept from the input half of the backward to the weight half.
    pub deferred: f64,
    /// The largest extra allocation while the layer's backward runs (its saved state
    /// still alive).
    pub backward_work: f64,
    /// The largest extra allocation of the forward beyond what it keeps (attention scores).
    pub forward_work: f64,
    /// Of `saved`, what `train.offload` moves to pinned host memory until the backward.
    pub parked: f64,
}

/// The activation peak of one micro-batch on one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroBatchPeak {
    /// Σ of the layers' saved state plus the head's (what one micro-batch in flight
    /// holds between its forward and backward).
    pub saved: f64,
    /// Of `saved`, the MoE part.
    pub saved_moe: f64,
    /// The peak of live activation bytes while this micro-batch runs.
    pub peak: f64,
    /// Bytes `train.offload` keeps in pinned host memory at the end of the forward.
    pub parked: f64,
}

/// Element sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Bytes {
    /// Activations and their gradients.
    act: f64,
    /// Tensors that stay f32 in mixed precision (and i32 indices).
    f32: f64,
    attention: AttentionKernel,
}

impl Bytes {
    fn of(precision: Precision, attention: AttentionKernel) -> Bytes {
        match precision {
            Precision::F32 => Bytes {
                act: 4.0,
                f32: 4.0,
                attention: AttentionKernel::Unfused,
            },
            Precision::Bf16 => Bytes {
                act: 2.0,
                f32: 4.0,
                attention,
            },
        }
    }

    fn fused(&self) -> bool {
        self.attention == AttentionKernel::Fused
    }
}

/// Shape of one micro-batch on one rank.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Tokens N = B·T.
    n: f64,
    /// B·heads rows of attention (this TP rank's heads).
    bh: f64,
    /// T.
    t: f64,
    /// d_model.
    h: f64,
    /// Query width heads·head_dim (this TP rank).
    hq: f64,
    /// Key/value width kv_heads·head_dim (this TP rank).
    hkv: f64,
}

fn shape(plan: &Plan) -> Shape {
    let m = &plan.model;
    let tp = plan.parallel.tp.max(1);
    let t = (m.seq_len / plan.parallel.cp.max(1)) as f64;
    let b = plan.batch.micro_batch_size as f64;
    let nh = (m.n_heads / tp).max(1) as f64;
    let nkv = (m.n_kv_heads / tp).max(1) as f64;
    let hd = m.head_dim as f64;
    Shape {
        n: b * t,
        bh: b * nh,
        t,
        h: m.d_model as f64,
        hq: nh * hd,
        hkv: nkv * hd,
    }
}

/// Attention sub-layer with its two norms and residual: (saved, deferred, backward work,
/// forward work).
fn attention_store(s: Shape, by: Bytes, first_layer: bool) -> (f64, f64, f64, f64) {
    let (n, a, f) = (s.n, by.act, by.f32);
    let tt = s.bh * s.t * s.t;
    // Layer 0's input is the embedding's f32 output.
    let x_in = if first_layer {
        n * s.h * f
    } else {
        n * s.h * a
    };
    // rstd ×2, h1, x1, h2 (the FFN's input), q, repeated k and v (query width).
    let mut saved = x_in + 2.0 * n * f + 3.0 * n * s.h * a + 3.0 * n * s.hq * a;
    // The attention op's state and the heads' output before o_proj.
    let (state, o) = if by.fused() {
        (s.bh * s.t * f, n * s.hq * a)
    } else {
        (tt * a, n * s.hq * f)
    };
    saved += state + o;
    // Deferred: o_proj's d_y and d_q, d_k, d_v are new; h1 and o move over from `saved`.
    let (dq, dkv) = if by.fused() {
        (a, if s.hkv < s.hq { f } else { a })
    } else {
        (f, f)
    };
    let new = n * s.h * a + n * s.hq * dq + 2.0 * n * s.hkv * dkv;
    let deferred = new + n * s.h * a + o;
    // Backward work: d_o (query width), the new deferred gradients, the un-reduced
    // repeated d_k, d_v, and unfused the score gradients (f32 bmm) and softmax gradients.
    let mut work = n * s.hq * a + new + 2.0 * n * s.hq * dkv;
    if !by.fused() {
        work += tt * (f + a);
    }
    // Forward work: unfused, the f32 scores before the softmax.
    let fwd = if by.fused() { 0.0 } else { tt * f };
    (saved, deferred, work, fwd)
}

/// Dense FFN of width `hidden` (per TP rank): (saved, deferred, backward work).
fn mlp_store(n: f64, h: f64, hidden: f64, act: Activation, by: Bytes) -> (f64, f64, f64) {
    let a = by.act;
    let swiglu = act == Activation::SwiGlu;
    // gate (SwiGLU), up, the activation.
    let kept = if swiglu { 3.0 } else { 2.0 };
    let saved = kept * n * hidden * a;
    // d_y, and the pre-activation gradients (f32 from the SwiGLU backward).
    let d_pre = if swiglu {
        2.0 * n * hidden * by.f32
    } else {
        n * hidden * a
    };
    let new = n * h * a + d_pre;
    // Kept from `saved`: the input (h2, counted with the attention) and the activation.
    let deferred = new + n * hidden * a;
    // Plus d_act and d_x while the saved state lives.
    let work = new + n * hidden * a + n * h * a;
    (saved, deferred, work)
}

/// The MoE FFN: (saved, deferred, backward work).
fn moe_store(plan: &Plan, n: f64, by: Bytes) -> (f64, f64, f64) {
    let Some(moe) = &plan.moe else {
        return (0.0, 0.0, 0.0);
    };
    let (a, f) = (by.act, by.f32);
    let h = plan.model.d_model as f64;
    let k = moe.routing.slots_per_token as f64;
    let pool = moe
        .null_slots
        .map_or(moe.routed_experts, |s| s.expanded_pool_size) as f64;
    let e = moe.routed_experts as f64;
    let fe = moe.expert_hidden as f64;
    let swiglu = moe.activation == Activation::SwiGlu;
    let inter = if swiglu { 3.0 } else { 2.0 };
    // Rows the local experts compute: T·k balanced, or the static buffers.
    let (rows, source_rows) = match (moe.pad_to_capacity, moe.routing.capacity) {
        (true, Some(c)) => {
            let r = (moe.experts_per_ep_rank * plan.parallel.ep * c) as f64;
            // slot_row [N,K], row_token [E·C], gates [N,K]
            (r, 2.0 * n * k * f + r * f)
        }
        // token, assignment, row gate per kept row
        _ => (n * k, 3.0 * n * k * f),
    };
    // Routing: slots, gates, logits; keep; router: raw gates (or the pre-softmax score),
    // real-slot mask (null slots), normalisation input; dispatch layout; z-loss softmax
    // and lse; the balancing loss's coefficient and probabilities.
    let mut routing = 3.0 * n * k * f + n * pool * f + e * f;
    routing += if moe.pre_softmax {
        n * pool * f
    } else {
        n * k * f
    };
    if moe.null_slots.is_some() {
        routing += n * k * f;
    }
    if moe.normalize {
        routing += n * k * f;
    }
    routing += source_rows + n * pool * f + n * f;
    if moe.aux_loss != AuxLossKind::None {
        routing += 2.0 * n * pool * f;
    }
    // Expert rows in, intermediates, rows back at the source.
    let experts = rows * h * a + inter * rows * fe * a + rows * h * a;
    let mut saved = routing + experts;
    // Deferred: d_logits, expert d_out and pre-activation gradients.
    let d_pre = |r: f64, w: f64| {
        if swiglu {
            2.0 * r * w * f
        } else {
            r * w * a
        }
    };
    let mut new = n * pool * f + rows * h * a + d_pre(rows, fe);
    // Kept from `saved`: the expert rows in and the activation.
    let mut kept = rows * h * a + rows * fe * a;
    // Work: d_act, the rows' input gradient, d_x and its source-side sum.
    let mut work = rows * fe * a + rows * h * a + 2.0 * n * h * a;
    if let Some(sh) = moe.shared {
        let fs = (sh.total_hidden / plan.parallel.tp.max(1)) as f64;
        saved += inter * n * fs * a;
        if sh.gate {
            saved += n * h * a + n * f;
        }
        new += n * h * a + d_pre(n, fs);
        kept += n * fs * a;
        work += n * fs * a;
    }
    work += new;
    (saved, new + kept, work)
}

/// Bytes layer `l` keeps and allocates for one micro-batch.
pub fn layer_store(plan: &Plan, l: usize, attention: AttentionKernel) -> LayerStore {
    let by = Bytes::of(plan.train.precision, attention);
    let s = shape(plan);
    let (sa, da, wa, fa) = attention_store(s, by, l == 0);
    let parked = parked_bytes(plan, l, s, by);
    let (sf, df, wf, moe) = if plan.is_moe_layer(l) {
        let (sm, dm, wm) = moe_store(plan, s.n, by);
        (sm, dm, wm, sm)
    } else {
        let hidden = (plan.model.ffn_hidden / plan.parallel.tp.max(1)) as f64;
        let (sm, dm, wm) = mlp_store(s.n, s.h, hidden, plan.model.dense_activation, by);
        (sm, dm, wm, 0.0)
    };
    // The FFN's backward runs with both saved states alive; the attention's after the
    // FFN's saved state became its deferred work.
    let backward_work = wf.max(df + wa - sf);
    LayerStore {
        saved: sa + sf,
        saved_moe: moe,
        deferred: da + df,
        backward_work: backward_work.max(0.0),
        forward_work: fa,
        parked,
    }
}

/// Bytes of layer `l`'s saved state the `train.offload` targets move to the host (the
/// tensors `megamoe_model`'s offload visits; GPU runs).
fn parked_bytes(plan: &Plan, l: usize, s: Shape, by: Bytes) -> f64 {
    let t = plan.train.offload;
    if t.is_empty() || plan.train.recompute == Recompute::Full {
        return 0.0;
    }
    let (n, a, f) = (s.n, by.act, by.f32);
    let mut p = 0.0;
    if t.contains(OffloadTarget::QkvLinear) {
        p += n * s.h * a;
    }
    if t.contains(OffloadTarget::CoreAttn) {
        let state = if by.fused() {
            s.bh * s.t * f
        } else {
            s.bh * s.t * s.t * a
        };
        p += 3.0 * n * s.hq * a + state;
    }
    if t.contains(OffloadTarget::AttnProj) {
        p += n * s.hq * if by.fused() { a } else { f };
    }
    match plan.moe.as_ref().filter(|_| plan.is_moe_layer(l)) {
        None if t.contains(OffloadTarget::Mlp) => {
            let hidden = (plan.model.ffn_hidden / plan.parallel.tp.max(1)) as f64;
            let kept = if plan.model.dense_activation == Activation::SwiGlu {
                3.0
            } else {
                2.0
            };
            p += n * s.h * a + kept * n * hidden * a;
        }
        None => {}
        Some(moe) => {
            let rows = match (moe.pad_to_capacity, moe.routing.capacity) {
                (true, Some(c)) => (moe.experts_per_ep_rank * plan.parallel.ep * c) as f64,
                _ => n * moe.routing.slots_per_token as f64,
            };
            let inter = if moe.activation == Activation::SwiGlu {
                3.0
            } else {
                2.0
            };
            if t.contains(OffloadTarget::Moe) {
                p += inter * rows * moe.expert_hidden as f64 * a + rows * s.h * a;
                if let Some(sh) = moe.shared {
                    p += inter * n * (sh.total_hidden / plan.parallel.tp.max(1)) as f64 * a;
                }
            }
            if t.contains(OffloadTarget::ExpertFc1) {
                p += rows * s.h * a;
            }
        }
    }
    p
}

/// The activation peak of one micro-batch through `layers` (bottom to top), with the
/// head (`has_head`: logits, loss gradient, final norm) when this rank holds it.
pub fn micro_batch_peak(
    plan: &Plan,
    layers: &[usize],
    has_head: bool,
    attention: AttentionKernel,
) -> MicroBatchPeak {
    let by = Bytes::of(plan.train.precision, attention);
    let s = shape(plan);
    let stores: Vec<LayerStore> = layers
        .iter()
        .map(|&l| layer_store(plan, l, attention))
        .collect();
    let full = plan.train.recompute == Recompute::Full;
    // Full recompute keeps only each layer's input until its backward recomputes it.
    let kept = |st: &LayerStore, l: usize| {
        if full {
            s.n * s.h * if l == 0 { by.f32 } else { by.act }
        } else {
            st.saved
        }
    };
    // The head is whole on every TP rank.
    let v = plan.model.vocab_size as f64;
    // Head: logits (held by the step), ∂loss/∂logits, the final norm's input, rstd and
    // output; in the backward the scaled ∂logits and d_hf.
    let (head_saved, head_back, d_logits) = if has_head {
        let logits = s.n * v * by.act;
        (
            2.0 * logits + 2.0 * s.n * s.h * by.act + s.n * by.f32,
            logits + s.n * s.h * by.act,
            logits,
        )
    } else {
        (0.0, 0.0, 0.0)
    };
    let saved_layers: f64 = stores.iter().zip(layers).map(|(st, &l)| kept(st, l)).sum();
    let saved = saved_layers + head_saved;
    let saved_moe = if full {
        0.0
    } else {
        stores.iter().map(|st| st.saved_moe).sum()
    };
    // Offload: a layer's parked bytes leave the device after its forward and come back
    // while the layer above runs its backward.
    let parked: f64 = stores.iter().map(|st| st.parked).sum();
    // Forward: the layers' stores grow; the top layer's scores on top.
    let mut peak: f64 = 0.0;
    let mut below = 0.0;
    for (st, &l) in stores.iter().zip(layers) {
        let extra = if full { st.saved } else { 0.0 };
        peak = peak.max(below + st.saved + st.forward_work - kept(st, l) + extra);
        below += kept(st, l) - st.parked;
    }
    peak = peak.max(saved - parked + stores.last().map_or(0.0, |st| st.parked));
    // Backward: the head first, then the layers top to bottom.
    let mut above_deferred = 0.0;
    let mut remaining = saved_layers - parked;
    let head_alive = head_saved - d_logits + head_back;
    peak = peak.max(saved - parked + stores.last().map_or(0.0, |st| st.parked) + head_back);
    for (i, (st, &l)) in stores.iter().zip(layers).enumerate().rev() {
        remaining -= kept(st, l) - st.parked;
        let recomputed = if full { st.saved } else { 0.0 };
        // The layer below is fetched back while this layer's backward runs.
        let prefetched = i.checked_sub(1).map_or(0.0, |b| stores[b].parked);
        let here = remaining
            + prefetched
            + kept(st, l)
            + recomputed
            + st.backward_work
            + above_deferred
            + head_alive;
        peak = peak.max(here);
        above_deferred += st.deferred;
    }
    MicroBatchPeak {
        saved,
        saved_moe,
        peak: peak.max(above_deferred + head_alive),
        parked,
    }
}
