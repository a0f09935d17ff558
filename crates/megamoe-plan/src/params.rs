//! Parameter counts per layer and per pipeline rank, split by how they shard.
//!
//! Classes, as the trainer holds them under tensor parallelism: `tp_matrix` (hidden
//! matrices split by TP: attention, dense FFN, shared experts, the MTP blocks' attention
//! and FFN — Muon-eligible), `matrix` (hidden matrices every TP rank holds whole: GateSkip
//! and FlexiDepth matrices, MTP input projections — Muon-eligible), `replicated` (norms,
//! router, gates' biases, scalars — AdamW), `expert` (routed expert matrices, split by EP
//! only: each TP rank holds its EP rank's experts whole — Muon-eligible), `vocab`
//! (embedding and LM head, whole on every TP rank — AdamW).

use crate::modes::{GateKind, MtpMode};
use crate::plan::Plan;
use serde::{Deserialize, Serialize};

/// Parameter counts by sharding class (global counts, before any split).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamCount {
    /// Hidden matrices split by TP.
    pub tp_matrix: f64,
    /// Hidden matrices every TP rank holds whole.
    pub matrix: f64,
    /// Replicated small tensors.
    pub replicated: f64,
    /// Routed expert matrices.
    pub expert: f64,
    /// Embedding / LM head.
    pub vocab: f64,
}

impl ParamCount {
    /// Total count.
    pub fn total(&self) -> f64 {
        self.tp_matrix + self.matrix + self.replicated + self.expert + self.vocab
    }

    /// Hidden (Muon-eligible) matrices other than the routed experts.
    pub fn dense_matrix(&self) -> f64 {
        self.tp_matrix + self.matrix
    }

    fn add(&mut self, o: ParamCount) {
        self.tp_matrix += o.tp_matrix;
        self.matrix += o.matrix;
        self.replicated += o.replicated;
        self.expert += o.expert;
        self.vocab += o.vocab;
    }

    /// This count as held by one rank of the trainer: tp_matrix / tp, expert / ep, the
    /// rest whole (routed experts, embedding and head are not split over TP).
    pub fn per_rank(&self, tp: usize, ep: usize) -> ParamCount {
        let (tp, ep) = (tp.max(1) as f64, ep.max(1) as f64);
        ParamCount {
            tp_matrix: self.tp_matrix / tp,
            matrix: self.matrix,
            replicated: self.replicated,
            expert: self.expert / ep,
            vocab: self.vocab,
        }
    }
}

/// Attention + two norms of one block: q [nh·hd, d], k,v [nkv·hd, d], o [d, nh·hd].
fn attention_block(plan: &Plan) -> ParamCount {
    let m = &plan.model;
    let (d, hd) = (m.d_model as f64, m.head_dim as f64);
    ParamCount {
        tp_matrix: 2.0 * d * m.n_heads as f64 * hd + 2.0 * d * m.n_kv_heads as f64 * hd,
        replicated: 2.0 * d,
        ..Default::default()
    }
}

/// Dense FFN of width `hidden`.
fn dense_ffn(plan: &Plan, hidden: usize) -> ParamCount {
    ParamCount {
        tp_matrix: (plan.model.dense_activation.matrices() * plan.model.d_model * hidden) as f64,
        ..Default::default()
    }
}

/// Parameters of transformer layer `l` (attention, FFN or MoE, GateSkip, FlexiDepth).
pub fn layer_params(plan: &Plan, l: usize) -> ParamCount {
    let d = plan.model.d_model as f64;
    let mut c = attention_block(plan);
    match plan.moe.as_ref().filter(|_| plan.is_moe_layer(l)) {
        Some(moe) => {
            let e = moe.routed_experts as f64;
            let null_row = if moe.null_slots.is_some() { d } else { 0.0 };
            c.replicated += e * d + null_row;
            c.expert += e * (moe.activation.matrices() * moe.expert_hidden) as f64 * d;
            if let Some(s) = moe.shared {
                c.tp_matrix += (moe.activation.matrices() * s.total_hidden) as f64 * d;
                if s.gate {
                    c.replicated += d;
                }
            }
        }
        None => c.add(dense_ffn(plan, plan.model.ffn_hidden)),
    }
    if let Some(g) = plan.gate_skip {
        // Two gates (attention branch, FFN branch): W_g [d, d] + b [d], or [1, d] + [1].
        match g.gate {
            GateKind::Vector => {
                c.matrix += 2.0 * d * d;
                c.replicated += 2.0 * d;
            }
            GateKind::Scalar => c.replicated += 2.0 * (d + 1.0),
        }
    }
    if let Some(f) = plan.flexi_depth {
        if l >= f.first_adaptive_layer {
            let r = f.router_hidden as f64;
            // W_enc [d/r, d], W_dec [d, d/r], adapter SwiGLU 3·d·adapter_hidden.
            c.matrix += 2.0 * r * d + 3.0 * d * f.adapter_hidden as f64;
            // w_head [1, d], RMSNorm_in [d], RMSNorm_r [d/r].
            c.replicated += 2.0 * d + r;
        }
    }
    c
}

/// MTP blocks (last stage): per block attention (with its two norms) + dense FFN +
/// input projection [d, 2d]; the MTP RMSNorms of h, e and the output carry no weight. One
/// block (shared) or `depth` (sequential).
pub fn mtp_params(plan: &Plan) -> ParamCount {
    let Some(mtp) = &plan.mtp else {
        return ParamCount::default();
    };
    let d = plan.model.d_model as f64;
    let blocks = match mtp.mode {
        MtpMode::Shared => 1.0,
        MtpMode::Sequential => mtp.depth as f64,
    };
    let mut block = attention_block(plan);
    block.add(dense_ffn(plan, plan.model.ffn_hidden));
    block.matrix += 2.0 * d * d;
    ParamCount {
        tp_matrix: blocks * block.tp_matrix,
        matrix: blocks * block.matrix,
        replicated: blocks * block.replicated,
        ..Default::default()
    }
}

/// Parameters held by pipeline rank `pp_rank` (whole TP/EP groups, before TP/EP splits).
/// DualPipe ranks hold two stages (their own and the mirrored copy), so 2× layers.
pub fn rank_params(plan: &Plan, pp_rank: usize) -> ParamCount {
    let mut c = ParamCount::default();
    let Some(rs) = plan.stages.ranks.get(pp_rank) else {
        return c;
    };
    for range in &rs.layers {
        for l in range.clone() {
            c.add(layer_params(plan, l));
        }
    }
    let (v, d) = (plan.model.vocab_size as f64, plan.model.d_model as f64);
    if rs.has_embedding {
        c.vocab += v * d;
    }
    if rs.has_head {
        c.replicated += d; // final norm
        if !plan.model.tie_embeddings {
            c.vocab += v * d; // LM head
        }
        // A tied head and MTP read the embedding: on the embedding's rank they reuse it,
        // on another rank it is a copy.
        let head_reads_embedding = plan.model.tie_embeddings || plan.mtp.is_some();
        if head_reads_embedding && !rs.has_embedding {
            c.vocab += v * d;
        }
        c.add(mtp_params(plan));
    }
    c
}

/// Global parameter count of the model (each layer once; tied head counted once).
pub fn model_params(plan: &Plan) -> ParamCount {
    let mut c = ParamCount::default();
    for l in 0..plan.model.n_layers {
        c.add(layer_params(plan, l));
    }
    let (v, d) = (plan.model.vocab_size as f64, plan.model.d_model as f64);
    c.vocab += if plan.model.tie_embeddings {
        v * d
    } else {
        2.0 * v * d
    };
    c.replicated += d;
    c.add(mtp_params(plan));
    c
}
