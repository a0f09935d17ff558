//! Tensor parallelism over the blocks (Megatron-LM column/row-parallel layers).
//!
//! With a TP group of size `tp`, rank `r` of the group holds, in every block (the MTP
//! block too):
//!
//! | weight                                   | one-rank shape | rank `r` holds                         |
//! |------------------------------------------|----------------|----------------------------------------|
//! | `self_attn.q_proj`                       | `[NH·D, H]`    | rows of query heads `r·NH/tp..`        |
//! | `self_attn.k_proj`, `v_proj`             | `[NKV·D, H]`   | rows of KV heads `r·NKV/tp..`          |
//! | `self_attn.o_proj`                       | `[H, NH·D]`    | columns of its query heads             |
//! | dense `mlp.gate_proj`, `up_proj`         | `[F, H]`       | rows `r·F/tp..`                        |
//! | dense `mlp.down_proj`                    | `[H, F]`       | columns `r·F/tp..`                     |
//! | `mlp.shared_experts.*`                   | `[Fs, H]` ...  | hidden units `r·Fs/tp..` (same split)  |
//!
//! Query heads and KV heads are split by the seed's partition rule
//! (`megamoe_plan::partition_qkv_heads`: both divisible by tp), so a rank's query heads read
//! only its own KV heads (GQA groups stay whole). Everything else — norms, router, routed
//! experts, skip gates, FlexiDepth router and adapter, embedding, LM head — is replicated.
//!
//! Each split branch is `f` (identity) → local GEMMs → `g` (all-reduce of the partial
//! output, [`TensorParallel::reduce`]); its backward all-reduces the partial input gradient.
//! Weights are drawn as the exact rows / columns of the one-rank tensors
//! (`Tensor::rand_named_slice`), so a TP layout trains the one-rank model.
//!
//! # Sequence parallelism ([`Model::set_sequence_parallel`])
//! Between the split branches the residual stream is sharded along the sequence: rank `r`
//! holds tokens `[r·T/tp, (r+1)·T/tp)` of every sequence (`[B·T/tp, H]`). Per block:
//!
//! ```text
//! x_s ─ norm ─ all-gather(T) ─ attention (own heads) ─ reduce-scatter(T) ─ + ─ x1_s
//! x1_s ─ norm ─ all-gather(T) ─ dense FFN (own units) ─ reduce-scatter(T) ─ + ─ y_s
//! x1_s ─ norm ─ all-gather(T) ─ MoE FFN (whole micro-batch) ─ own rows ──── + ─ y_s
//! ```
//! Backward is the conjugate (all-gather ↔ reduce-scatter; own rows ↔ all-gather). The
//! norms and residual adds run on the shard, so their saved activations are `1/tp` of the
//! replicated ones; the norm weights' gradients are partial sums over the shard tokens and
//! are summed over the TP group in the block's backward (then replicated as without sp).
//! An MoE layer routes the whole gathered micro-batch on every TP rank, as without sp
//! (its routed experts are whole on each TP rank): routing, capacity drops, the aux and z
//! losses and the expert-bias counts are those of one rank, then each rank keeps its rows.
//! The embedding runs whole and each rank keeps its shard; the head chunk's final norm runs
//! on the shard and its output is all-gathered before the LM head, CE and MTP (which run
//! on the whole sequence, the MTP block without sp). `T` must divide by tp (named error);
//! GateSkip and FlexiDepth (per-sequence budgets, per-token routers on the residual) are
//! refused under sp.

use std::ops::Range;

use megamoe_moe::{tp_slice, TensorParallel};
use megamoe_plan::partition_qkv_heads;
use megamoe_tensor::{InitDist, Tensor};

use crate::attention::{AttentionConfig, AttentionParams};
use crate::block::Block;
use crate::error::{Error, Result};
use crate::ffn::Ffn;
use crate::init::Init;
use crate::mlp::{MlpConfig, MlpParams};
use crate::model::Model;

/// One block's tensor-parallel slice: the group and the one-rank shapes it slices.
#[derive(Debug, Clone)]
pub struct BlockTp {
    /// The TP group.
    pub group: TensorParallel,
    /// One-rank attention shape.
    pub attn: AttentionConfig,
    /// This rank's query heads (of `attn.n_heads`).
    pub heads: Range<usize>,
    /// This rank's KV heads (of `attn.n_kv_heads`).
    pub kv_heads: Range<usize>,
    /// One-rank dense FFN shape and this rank's hidden units (dense FFN blocks).
    pub mlp: Option<(MlpConfig, Range<usize>)>,
    /// Sequence parallel: the block's input and output are this rank's sequence shard.
    pub sp: bool,
}

impl BlockTp {
    /// `g` / `f'`: the group sum of a partial branch output or input gradient `[B·T, H]`
    /// (of `b` sequences); under sp only this rank's sequence shard of it (reduce-scatter).
    pub(crate) fn reduce(&self, partial: &Tensor, b: usize) -> Result<Tensor> {
        if self.sp {
            return Ok(self.group.seq_reduce_scatter(partial, b)?);
        }
        Ok(self.group.reduce(partial)?)
    }

    /// A branch input (or a branch output gradient): the whole sequence, all-gathered from
    /// the shards under sp (unchanged without).
    pub(crate) fn gather(&self, x: &Tensor, b: usize) -> Result<Tensor> {
        if self.sp {
            return Ok(self.group.seq_gather(x, b)?);
        }
        Ok(x.clone())
    }

    /// A replicated branch output (or input gradient): this rank's rows under sp.
    pub(crate) fn shard(&self, x: &Tensor, b: usize) -> Result<Tensor> {
        if self.sp {
            return Ok(self.group.seq_shard(x, b)?);
        }
        Ok(x.clone())
    }

    /// A replicated parameter's gradient computed from the shard's tokens: summed over the
    /// group under sp (then the same on every TP rank); unchanged without.
    pub(crate) fn sum_shard_grad(&self, g: Tensor) -> Result<Tensor> {
        if self.sp {
            return Ok(self.group.reduce(&g)?);
        }
        Ok(g)
    }
}

/// The slice `range` along `dim` of the named one-rank `N(0, std²)` tensor of `dims`.
fn randn_slice(
    init: &Init,
    name: &str,
    dims: &[usize],
    dim: usize,
    range: Range<usize>,
    std: f32,
) -> Result<Tensor> {
    Ok(Tensor::rand_named_slice(
        init.seed,
        name,
        &dims.to_vec().into(),
        dim,
        range,
        InitDist::Normal { std },
        init.device,
    )?)
}

impl BlockTp {
    /// This rank's attention weights: the rows / columns of its heads.
    pub(crate) fn init_attention(
        &self,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<AttentionParams> {
        let c = &self.attn;
        let (h, d) = (c.d_model, c.head_dim);
        let (q, kv) = (c.n_heads * d, c.n_kv_heads * d);
        let qr = self.heads.start * d..self.heads.end * d;
        let kr = self.kv_heads.start * d..self.kv_heads.end * d;
        let name = |w: &str| format!("{prefix}.{w}_proj.weight");
        Ok(AttentionParams {
            q_proj: randn_slice(init, &name("q"), &[q, h], 0, qr.clone(), std)?,
            k_proj: randn_slice(init, &name("k"), &[kv, h], 0, kr.clone(), std)?,
            v_proj: randn_slice(init, &name("v"), &[kv, h], 0, kr, std)?,
            o_proj: randn_slice(init, &name("o"), &[h, q], 1, qr, out_std)?,
        })
    }

    /// This rank's dense FFN weights: rows of gate / up, columns of down.
    pub(crate) fn init_mlp(
        &self,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<Option<MlpParams>> {
        let Some((cfg, cols)) = &self.mlp else {
            return Ok(None);
        };
        let (f, h) = (cfg.hidden, cfg.d_model);
        let name = |w: &str| format!("{prefix}.{w}_proj.weight");
        let gate_proj = match cfg.activation {
            megamoe_plan::Activation::SwiGlu => Some(randn_slice(
                init,
                &name("gate"),
                &[f, h],
                0,
                cols.clone(),
                std,
            )?),
            _ => None,
        };
        Ok(Some(MlpParams {
            gate_proj,
            up_proj: randn_slice(init, &name("up"), &[f, h], 0, cols.clone(), std)?,
            down_proj: randn_slice(init, &name("down"), &[h, f], 1, cols.clone(), out_std)?,
        }))
    }
}

impl Block {
    /// Splits this block over `group` (see the module doc): attention keeps this rank's
    /// heads, a dense FFN its hidden units, an MoE FFN its shared experts' hidden units.
    fn split_tensor_parallel(&mut self, group: &TensorParallel) -> Result<()> {
        let (rank, size) = (group.rank(), group.size());
        let attn = self.attn.cfg;
        let part = partition_qkv_heads(attn.n_heads, attn.n_kv_heads, size).map_err(|_| {
            Error::Config {
                field: "parallel.tp",
                value: format!(
                    "{size} (model.n_heads = {}, model.n_kv_heads = {})",
                    attn.n_heads, attn.n_kv_heads
                ),
                rule: "must divide model.n_heads and model.n_kv_heads (each TP rank holds \
                       whole query heads and whole KV heads)",
            }
        })?;
        let heads = rank * part.num_heads..(rank + 1) * part.num_heads;
        let kv_heads = rank * part.num_kv_heads..(rank + 1) * part.num_kv_heads;
        self.attn.cfg.n_heads = part.num_heads;
        self.attn.cfg.n_kv_heads = part.num_kv_heads;
        let mut mlp = None;
        match &mut self.ffn {
            Ffn::Dense(m) => {
                let cols = tp_slice("model.ffn_hidden", m.cfg.hidden, rank, size)?;
                mlp = Some((m.cfg, cols.clone()));
                m.cfg.hidden = cols.len();
            }
            Ffn::Moe(m) => {
                **m = (**m).clone().with_tensor_parallel(group.clone())?;
            }
        }
        self.tp = Some(BlockTp {
            group: group.clone(),
            attn,
            heads,
            kv_heads,
            mlp,
            sp: false,
        });
        Ok(())
    }
}

impl Model {
    /// Splits every block (and the MTP block) over the tensor-parallel `group`; then
    /// [`Model::init_params`] gives this rank's slices of the one-rank weights. Call after
    /// [`Model::set_moe_dispatcher`]. A group of size 1 changes nothing.
    pub fn set_tensor_parallel(&mut self, group: TensorParallel) -> Result<()> {
        if group.size() <= 1 {
            return Ok(());
        }
        for b in &mut self.blocks {
            b.split_tensor_parallel(&group)?;
        }
        if let Some(m) = &mut self.mtp {
            m.block.split_tensor_parallel(&group)?;
        }
        self.tp = Some(group);
        Ok(())
    }

    /// Shards the residual stream of every block (not the MTP block) along the sequence
    /// over the tensor-parallel group (module doc). Call after
    /// [`Model::set_tensor_parallel`]; a group of size 1 changes nothing. Refuses GateSkip
    /// and FlexiDepth by name.
    pub fn set_sequence_parallel(&mut self) -> Result<()> {
        let Some(group) = self.tp.clone() else {
            return Ok(());
        };
        let refuse = |field: &'static str| Error::Config {
            field,
            value: "on (parallel.sp = true)".to_string(),
            rule: "is not combined with sequence parallelism (its gates and routers read \
                   whole sequences of the residual stream); set parallel.sp = false",
        };
        if self.cfg.gate_skip.is_some() {
            return Err(refuse("gateskip"));
        }
        if self.cfg.flexi_depth.is_some() {
            return Err(refuse("flexidepth"));
        }
        group.seq_shard_len(self.cfg.seq_len)?;
        for b in &mut self.blocks {
            if let Some(tp) = &mut b.tp {
                tp.sp = true;
            }
        }
        self.seq_tp = Some(group);
        Ok(())
    }

    /// Whether the residual stream is sharded along the sequence over the TP group.
    pub fn sequence_parallel(&self) -> bool {
        self.seq_tp.is_some()
    }

    /// Rows of the hidden state `[·, H]` between blocks for `b` sequences of `t` tokens:
    /// `b·t`, or `b·t/tp` under sequence parallelism.
    pub fn hidden_rows(&self, b: usize, t: usize) -> Result<usize> {
        match &self.seq_tp {
            Some(g) => Ok(b * g.seq_shard_len(t)?),
            None => Ok(b * t),
        }
    }

    /// The whole `[b·t, H]` → this rank's sequence shard under sp (unchanged without).
    pub(crate) fn seq_shard(&self, x: Tensor, b: usize) -> Result<Tensor> {
        match &self.seq_tp {
            Some(g) => Ok(g.seq_shard(&x, b)?),
            None => Ok(x),
        }
    }

    /// Collective under sp: the whole `[b·t, H]` from the sequence shards.
    pub(crate) fn seq_gather(&self, x: Tensor, b: usize) -> Result<Tensor> {
        match &self.seq_tp {
            Some(g) => Ok(g.seq_gather(&x, b)?),
            None => Ok(x),
        }
    }

    /// Collective under sp: a replicated parameter's gradient from the shard's tokens
    /// summed over the TP group.
    pub(crate) fn seq_sum(&self, g: Tensor) -> Result<Tensor> {
        match &self.seq_tp {
            Some(group) => Ok(group.reduce(&g)?),
            None => Ok(g),
        }
    }

    /// The tensor-parallel group the model is split over (`None`: whole on this rank).
    pub fn tensor_parallel(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    /// The dimension along which the TP ranks split parameter `name`, or `None` when the
    /// parameter is replicated (always `None` without tensor parallelism).
    pub fn tp_split_dim(&self, name: &str) -> Option<usize> {
        self.tp.as_ref()?;
        tp_split_dim(name)
    }
}

/// The dimension a tensor-parallel layout splits parameter `name` along (see the module
/// doc's table), or `None` for a replicated parameter.
pub fn tp_split_dim(name: &str) -> Option<usize> {
    const ROWS: [&str; 7] = [
        ".self_attn.q_proj.weight",
        ".self_attn.k_proj.weight",
        ".self_attn.v_proj.weight",
        ".mlp.gate_proj.weight",
        ".mlp.up_proj.weight",
        ".mlp.shared_experts.gate_proj",
        ".mlp.shared_experts.up_proj",
    ];
    const COLS: [&str; 3] = [
        ".self_attn.o_proj.weight",
        ".mlp.down_proj.weight",
        ".mlp.shared_experts.down_proj",
    ];
    if ROWS.iter().any(|s| name.ends_with(s)) {
        Some(0)
    } else if COLS.iter().any(|s| name.ends_with(s)) {
        Some(1)
    } else {
        None
    }
}

#[cfg(test)]
#[path = "tp_tests.rs"]
mod sp_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_dims_follow_the_megatron_layout() {
        for (name, dim) in [
            ("model.layers.0.self_attn.q_proj.weight", Some(0)),
            ("model.layers.3.self_attn.o_proj.weight", Some(1)),
            ("model.layers.0.mlp.up_proj.weight", Some(0)),
            ("model.layers.0.mlp.down_proj.weight", Some(1)),
            ("model.layers.1.mlp.shared_experts.gate_proj", Some(0)),
            ("model.layers.1.mlp.shared_experts.down_proj", Some(1)),
            ("mtp.layers.0.self_attn.v_proj.weight", Some(0)),
            // replicated
            ("model.layers.1.mlp.experts.gate_up_proj", None),
            ("model.layers.1.mlp.experts.up_proj", None),
            ("model.layers.1.mlp.router.weight", None),
            ("model.layers.1.mlp.shared_expert_gate.weight", None),
            ("model.layers.2.adapter.up_proj.weight", None),
            ("model.layers.0.input_layernorm.weight", None),
            ("model.embed_tokens.weight", None),
            ("lm_head.weight", None),
        ] {
            assert_eq!(tp_split_dim(name), dim, "{name}");
        }
    }
}
