//! The `[tp shards]` section of `megamoe plan`: every weight of a block (and the
//! model-level ones) with its one-rank shape and the shape each TP rank holds in training,
//! split by the trainer's own rule (`megamoe_model::tp::tp_split_dim`).

use std::fmt::{self, Write};

use megamoe_model::tp::tp_split_dim;
use megamoe_plan::{Activation, Plan};
use serde::Serialize;

/// One weight under tensor parallelism.
#[derive(Debug, Clone, Serialize)]
pub struct TpShard {
    /// Parameter name (`{i}` stands for the layer index).
    pub name: String,
    /// One-rank shape.
    pub shape: [usize; 2],
    /// Dimension split over the TP ranks (`None`: replicated).
    pub split_dim: Option<usize>,
    /// Shape on every TP rank.
    pub local: [usize; 2],
}

/// The weights of `plan`'s model with their TP shard shapes.
pub fn tp_shard_table(plan: &Plan) -> Vec<TpShard> {
    let m = &plan.model;
    let tp = plan.parallel.tp.max(1);
    let (h, q, kv) = (m.d_model, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim);
    let mut rows: Vec<(String, [usize; 2])> = vec![
        ("model.layers.{i}.self_attn.q_proj.weight".into(), [q, h]),
        ("model.layers.{i}.self_attn.k_proj.weight".into(), [kv, h]),
        ("model.layers.{i}.self_attn.v_proj.weight".into(), [kv, h]),
        ("model.layers.{i}.self_attn.o_proj.weight".into(), [h, q]),
    ];
    let has_dense = plan
        .moe
        .as_ref()
        .is_none_or(|moe| moe.moe_layers.len() < m.n_layers);
    if has_dense {
        let f = m.ffn_hidden;
        if m.dense_activation == Activation::SwiGlu {
            rows.push(("model.layers.{i}.mlp.gate_proj.weight".into(), [f, h]));
        }
        rows.push(("model.layers.{i}.mlp.up_proj.weight".into(), [f, h]));
        rows.push(("model.layers.{i}.mlp.down_proj.weight".into(), [h, f]));
    }
    if let Some(moe) = &plan.moe {
        rows.push((
            "model.layers.{i}.mlp.router.weight".into(),
            [moe.routed_experts, h],
        ));
        let f = moe.expert_hidden;
        // A swiglu bank holds gate and up fused: [2f, h] per expert.
        let (name, rows_in) = match moe.activation {
            Activation::SwiGlu => ("gate_up_proj", 2 * f),
            Activation::Relu2 | Activation::Gelu => ("up_proj", f),
        };
        rows.push((
            format!(
                "model.layers.{{i}}.mlp.experts.{name} (x{})",
                moe.experts_per_ep_rank
            ),
            [rows_in, h],
        ));
        if let Some(s) = moe.shared {
            let fs = s.total_hidden;
            if moe.activation == Activation::SwiGlu {
                rows.push((
                    "model.layers.{i}.mlp.shared_experts.gate_proj".into(),
                    [fs, h],
                ));
            }
            rows.push((
                "model.layers.{i}.mlp.shared_experts.up_proj".into(),
                [fs, h],
            ));
            rows.push((
                "model.layers.{i}.mlp.shared_experts.down_proj".into(),
                [h, fs],
            ));
        }
    }
    rows.push(("model.embed_tokens.weight".into(), [m.vocab_size, h]));
    if !m.tie_embeddings {
        rows.push(("lm_head.weight".into(), [m.vocab_size, h]));
    }
    rows.into_iter()
        .map(|(name, shape)| {
            let split_dim = tp_split_dim(&name).filter(|_| tp > 1);
            let mut local = shape;
            if let Some(d) = split_dim {
                local[d] /= tp;
            }
            TpShard {
                name,
                shape,
                split_dim,
                local,
            }
        })
        .collect()
}

/// Text form: one line per weight, then which slice each TP rank holds.
pub fn render_tp_shards(o: &mut String, plan: &Plan, table: &[TpShard]) -> fmt::Result {
    let tp = plan.parallel.tp;
    writeln!(
        o,
        "\n[tp shards] (training: each rank of a TP group holds slice r of the split weights)"
    )?;
    writeln!(
        o,
        "  {:<52} {:>12} {:>12}  split",
        "weight", "one rank", "per TP rank"
    )?;
    let dims = |s: [usize; 2]| format!("{}x{}", s[0], s[1]);
    for s in table {
        let split = match s.split_dim {
            Some(0) => format!("rows: rank r holds r*{0}..(r+1)*{0}", s.local[0]),
            Some(_) => format!("columns: rank r holds r*{0}..(r+1)*{0}", s.local[1]),
            None => "replicated".to_string(),
        };
        writeln!(
            o,
            "  {:<52} {:>12} {:>12}  {split}",
            s.name,
            dims(s.shape),
            dims(s.local)
        )?;
    }
    if tp > 1 {
        writeln!(
            o,
            "  norms, skip gates and the shared-expert gate are replicated; every split \
             branch is summed over the TP group (one all-reduce forward, one backward)"
        )?;
    }
    Ok(())
}
