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
}

impl BlockTp {
    /// `g` / `f'`: the group sum of a partial branch output or input gradient.
    pub(crate) fn reduce(&self, partial: &Tensor) -> Result<Tensor> {
        Ok(self.group.reduce(partial)?)
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
