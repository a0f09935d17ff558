//! [`ModelConfig`]: the model's slice of the validated [`Plan`], plus the few model-only
//! numbers (init std). Built once by [`ModelConfig::from_plan`]; every layer config is
//! derived from it.

use megamoe_plan::{
    Activation, FlexiDepthPlan, GateSkipPlan, MoePlan, MtpPlan, OffloadTargets, Plan, Recompute,
};

use crate::error::{Error, Result};

/// Everything the model needs to build its layers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// V.
    pub vocab_size: usize,
    /// H.
    pub d_model: usize,
    /// L.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Head dim D.
    pub head_dim: usize,
    /// Dense FFN width.
    pub ffn_hidden: usize,
    /// Dense FFN activation.
    pub dense_activation: Activation,
    /// Training T (the generate window).
    pub seq_len: usize,
    /// RoPE θ.
    pub rope_theta: f32,
    /// RMSNorm ε.
    pub norm_eps: f32,
    /// LM head = embedding.
    pub tie_embeddings: bool,
    /// MoE settings (`None`: dense model).
    pub moe: Option<MoePlan>,
    /// GateSkip (`None`: off).
    pub gate_skip: Option<GateSkipPlan>,
    /// FlexiDepth (`None`: off).
    pub flexi_depth: Option<FlexiDepthPlan>,
    /// MTP (`None`: off).
    pub mtp: Option<MtpPlan>,
    /// Activation recomputation (`Full`: keep only block inputs; `Selective` is treated as
    /// `None` — attention-only recompute is not implemented).
    pub recompute: Recompute,
    /// Saved activations moved to pinned host memory between forward and backward
    /// (`train.offload`; CUDA tensors only, see `offload.rs`).
    pub offload: OffloadTargets,
    /// Init seed.
    pub seed: u64,
    /// Std of hidden matrices and embeddings (0.02, GPT-2); residual output projections use
    /// `init_std / √(2L)`.
    pub init_std: f32,
}

impl ModelConfig {
    /// The model slice of a resolved plan.
    pub fn from_plan(plan: &Plan) -> Result<ModelConfig> {
        let m = &plan.model;
        let cfg = ModelConfig {
            vocab_size: m.vocab_size,
            d_model: m.d_model,
            n_layers: m.n_layers,
            n_heads: m.n_heads,
            n_kv_heads: m.n_kv_heads,
            head_dim: m.head_dim,
            ffn_hidden: m.ffn_hidden,
            dense_activation: m.dense_activation,
            seq_len: m.seq_len,
            rope_theta: m.rope_theta as f32,
            norm_eps: m.norm_eps as f32,
            tie_embeddings: m.tie_embeddings,
            moe: plan.moe.clone(),
            gate_skip: plan.gate_skip,
            flexi_depth: plan.flexi_depth,
            mtp: plan.mtp.clone(),
            recompute: plan.train.recompute,
            offload: plan.train.offload,
            seed: plan.train.seed,
            init_std: 0.02,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the rules the plan does not already enforce.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.head_dim", self.head_dim),
            ("model.ffn_hidden", self.ffn_hidden),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::Config {
                    field,
                    value: "0".into(),
                    rule: "must be >= 1",
                });
            }
        }
        if let Some(f) = &self.flexi_depth {
            if f.first_adaptive_layer == 0 || f.first_adaptive_layer >= self.n_layers {
                return Err(Error::Config {
                    field: "flexidepth.adaptive_layers",
                    value: f.adaptive_layers.to_string(),
                    rule: "must leave layer 0 non-adaptive and be >= 1",
                });
            }
        }
        Ok(())
    }

    /// Whether layer `l` has an MoE FFN.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.moe_layers.contains(&l))
    }

    /// Whether layer `l` is a FlexiDepth adaptive layer.
    pub fn is_adaptive_layer(&self, l: usize) -> bool {
        self.flexi_depth
            .as_ref()
            .is_some_and(|f| l >= f.first_adaptive_layer)
    }
}
