//! The whole decoder: embedding → blocks → final norm → LM head (tied optional) → CE, plus
//! the MTP head, with explicit forward / backward and an activation store.
//!
//! # A step, as the trainer sees it
//! ```text
//! let out = model.forward(&params, &ids, &targets, step)?;   // ids, targets: [B, T] i32
//! let values = out.losses.to_host()?;                          // one sync: every loss part
//! model.backward(&params, out.saved, &mut grads, 1.0 / grad_accum as f32)?;  // grads +=
//! ```
//! `forward` returns the unweighted loss parts ([`LossParts`]: `lm_loss`, `mtp_losses`, MoE
//! `aux`/`z`, GateSkip `gate_skip`, FlexiDepth `flexi_depth`) and their weighted `total`,
//! the statistics ([`ModelStats`]), and the saved activations ([`ModelSaved`]), which
//! `backward` consumes by value: their lifetime is exactly one forward → one backward.
//! `backward` differentiates `grad_scale · total`, applying every loss weight exactly once,
//! and ACCUMULATES into a [`ModelParams`] of gradients (zero it with
//! [`ModelParams::zeros_like`] at the start of a step).
//!
//! Under `Recompute::Full` the store keeps only each block's input and `backward` reruns
//! the block's forward (deterministic, so gradients are identical).

use std::sync::Arc;

use megamoe_moe::{MoeConfig, MoeLayer, MoeParams, TokenDispatcher};
use megamoe_optim::ParamRole;
use megamoe_tensor::{DType, Tensor};

use crate::attention::{Attention, AttentionConfig};
use crate::block::{Block, BlockParams};
use crate::chunk::{ChunkSaved, ChunkSpec};
use crate::chunk_params::{ChunkParams, EMBED_NAME};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::ffn::Ffn;
use crate::flexi_depth::FlexiDepthConfig;
use crate::gate_skip::{gate_skip_budget, GateSkipConfig};
use crate::init::{zeros_like_params, Init};
use crate::mlp::{Mlp, MlpConfig};
use crate::mtp::{MtpConfig, MtpHead, MtpParams};
use crate::norm::RmsNorm;
pub use crate::outputs::{LayerStats, LossParts, LossValues, ModelStats, StatsValues};

/// Every trained weight of the model (also the gradient and optimizer-moment type).
#[derive(Debug, Clone)]
pub struct ModelParams {
    /// `model.embed_tokens.weight [V, H]`.
    pub embed_tokens: Tensor,
    /// `model.layers.{i}.*`.
    pub layers: Vec<BlockParams>,
    /// `model.norm.weight [H]`.
    pub norm: Tensor,
    /// `lm_head.weight [V, H]`; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    /// `mtp.*`.
    pub mtp: Option<MtpParams>,
}

impl ModelParams {
    /// Enumerates every parameter with its HF-style name and role.
    pub fn visit(&self, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        f(
            "model.embed_tokens.weight",
            &self.embed_tokens,
            ParamRole::Embedding,
        );
        for (i, l) in self.layers.iter().enumerate() {
            l.visit(&format!("model.layers.{i}"), f);
        }
        f("model.norm.weight", &self.norm, ParamRole::Norm);
        if let Some(h) = &self.lm_head {
            f("lm_head.weight", h, ParamRole::Head);
        }
        if let Some(m) = &self.mtp {
            m.visit("mtp", f);
        }
    }

    /// Mutable twin of [`ModelParams::visit`] (same names, same order).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        f(
            "model.embed_tokens.weight",
            &mut self.embed_tokens,
            ParamRole::Embedding,
        );
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_mut(&format!("model.layers.{i}"), f);
        }
        f("model.norm.weight", &mut self.norm, ParamRole::Norm);
        if let Some(h) = &mut self.lm_head {
            f("lm_head.weight", h, ParamRole::Head);
        }
        if let Some(m) = &mut self.mtp {
            m.visit_mut("mtp", f);
        }
    }

    /// Zeros of the same structure (a gradient buffer; MoE layers carry no expert-bias
    /// buffer).
    pub fn zeros_like(&self) -> Result<ModelParams> {
        let mut z = self.clone();
        zeros_like_params(&mut |f| z.visit_mut(f))?;
        for (zl, l) in z.layers.iter_mut().zip(&self.layers) {
            zl.mlp = l.mlp.zeros_like()?;
        }
        Ok(z)
    }

    /// Non-trained buffers (MoE `router.expert_bias`), with HF-style names.
    pub fn visit_buffers(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        for (i, l) in self.layers.iter().enumerate() {
            l.mlp.visit_buffers(&format!("model.layers.{i}.mlp"), f);
        }
    }

    /// Mutable twin of [`ModelParams::visit_buffers`] (same names and order).
    pub fn visit_buffers_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.mlp.visit_buffers_mut(&format!("model.layers.{i}.mlp"), f);
        }
    }

    /// The MoE layers' parameters by layer index (for the expert-bias update).
    pub fn moe_layers_mut(&mut self) -> Vec<(usize, &mut MoeParams)> {
        self.layers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, l)| match &mut l.mlp {
                crate::ffn::FfnParams::Moe(p) => Some((i, &mut **p)),
                crate::ffn::FfnParams::Dense(_) => None,
            })
            .collect()
    }

    /// Number of trained scalars.
    pub fn numel(&self) -> usize {
        let mut n = 0;
        self.visit(&mut |_, t, _| n += t.numel());
        n
    }
}

/// The activation store of one forward; consumed by [`Model::backward`].
#[derive(Debug)]
pub struct ModelSaved {
    chunk: ChunkSaved,
}

/// Everything one forward produces.
#[derive(Debug)]
pub struct ModelForward {
    /// Loss parts.
    pub losses: LossParts,
    /// Statistics.
    pub stats: ModelStats,
    /// Activation store for `backward`.
    pub saved: ModelSaved,
    /// `[N, V]` logits of the main head.
    pub logits: Tensor,
}

/// Sampling settings of [`Model::generate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy; otherwise softmax(logits / temperature).
    pub temperature: f32,
    /// RNG seed.
    pub seed: u64,
}

/// The decoder (stateless: parameters are passed in).
#[derive(Debug, Clone)]
pub struct Model {
    /// Config.
    pub cfg: ModelConfig,
    /// One block per layer.
    pub blocks: Vec<Block>,
    /// MTP head.
    pub mtp: Option<MtpHead>,
    pub(crate) norm: RmsNorm,
    /// The dispatcher given by [`Model::set_moe_dispatcher`] (`None`: every expert local).
    pub(crate) moe_dispatcher: Option<Arc<dyn TokenDispatcher>>,
    /// The per-layer parameter hook ([`Model::set_block_gather`]; `None`: full parameters).
    pub(crate) block_gather: Option<Arc<dyn crate::param_gather::BlockGather>>,
    /// The per-layer gradient hook ([`Model::set_grad_ready`]).
    pub(crate) grad_ready: Option<Arc<dyn crate::grad_ready::GradReady>>,
    /// The group given by [`Model::set_tensor_parallel`] (`None`: whole on this rank).
    pub(crate) tp: Option<megamoe_moe::TensorParallel>,
    /// The group the residual stream is sequence-sharded over
    /// ([`Model::set_sequence_parallel`]; `None`: whole sequences).
    pub(crate) seq_tp: Option<megamoe_moe::TensorParallel>,
}

impl Model {
    /// Builds every layer from the config.
    pub fn new(cfg: ModelConfig) -> Result<Model> {
        cfg.validate()?;
        let norm = RmsNorm { eps: cfg.norm_eps };
        let attn = Attention::new(AttentionConfig {
            d_model: cfg.d_model,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            rope_theta: cfg.rope_theta,
        })?;
        let dense = Mlp {
            cfg: MlpConfig {
                d_model: cfg.d_model,
                hidden: cfg.ffn_hidden,
                activation: cfg.dense_activation,
            },
        };
        let gate = cfg.gate_skip.as_ref().map(|g| GateSkipConfig {
            d_model: cfg.d_model,
            gate: g.gate,
            penalty: g.penalty,
            init_bias: g.init_bias as f32,
            init_std: g.init_std as f32,
        });
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        let moe = match &cfg.moe {
            Some(m) => Some(MoeLayer::new(MoeConfig::from_moe_plan(
                cfg.d_model,
                cfg.seq_len,
                m,
            )?)?),
            None => None,
        };
        for layer in 0..cfg.n_layers {
            let ffn = match &moe {
                Some(m) if cfg.is_moe_layer(layer) => Ffn::Moe(Box::new(m.clone())),
                _ => Ffn::Dense(dense),
            };
            let flexi_depth = match &cfg.flexi_depth {
                Some(f) if cfg.is_adaptive_layer(layer) => Some(FlexiDepthConfig {
                    d_model: cfg.d_model,
                    router_hidden: f.router_hidden,
                    adapter_hidden: f.adapter_hidden.max(1),
                    threshold: f.threshold as f32,
                    router_order: f.router_order,
                    norm_eps: cfg.norm_eps,
                }),
                _ => None,
            };
            blocks.push(Block {
                layer,
                norm,
                attn,
                ffn,
                gate_skip: gate,
                flexi_depth,
                tp: None,
            });
        }
        let mtp = match &cfg.mtp {
            Some(m) => Some(MtpHead::new(
                MtpConfig {
                    mtp_depth: m.depth,
                    mode: m.mode,
                    step_weights: m.step_weights.iter().map(|&w| w as f32).collect(),
                    mtp_loss_weight: m.loss_weight as f32,
                    concat_order: m.concat_order,
                },
                Block {
                    layer: cfg.n_layers,
                    norm,
                    attn,
                    ffn: Ffn::Dense(dense),
                    gate_skip: None,
                    flexi_depth: None,
                    tp: None,
                },
                norm,
            )?),
            None => None,
        };
        Ok(Model {
            cfg,
            blocks,
            mtp,
            norm,
            moe_dispatcher: None,
            block_gather: None,
            grad_ready: None,
            tp: None,
            seq_tp: None,
        })
    }

    /// Moves every MoE layer's tokens through `dispatcher` (e.g. an expert-parallel one);
    /// the layers then hold only the dispatcher's local experts, and
    /// [`Model::init_params`] gives those rows of the global expert banks.
    pub fn set_moe_dispatcher(&mut self, dispatcher: Arc<dyn TokenDispatcher>) -> Result<()> {
        for b in &mut self.blocks {
            if let Ffn::Moe(m) = &mut b.ffn {
                let cfg = m.config().clone();
                **m = MoeLayer::with_dispatcher(cfg, dispatcher.clone())?;
            }
        }
        self.moe_dispatcher = Some(dispatcher);
        Ok(())
    }

    /// Fresh parameters from `cfg.seed` (layout-invariant, keyed by name).
    pub fn init_params(&self) -> Result<ModelParams> {
        self.init_chunk_params(&ChunkSpec::whole(self.blocks.len()))?
            .into_whole_model()
    }

    /// Fresh parameters of the chunk `spec` only: exactly the tensors
    /// [`ModelParams::split`] gives that chunk (its layers; the embedding on the input
    /// chunk, and on the head chunk when the head is tied or MTP reads it; the final norm,
    /// untied LM head and MTP on the head chunk), each drawn by the same named RNG as in
    /// [`Model::init_params`], so a pipeline stage materialises its own part of the same
    /// model and nothing else.
    pub fn init_chunk_params(&self, spec: &ChunkSpec) -> Result<ChunkParams> {
        self.chunk(spec.clone())?;
        let c = &self.cfg;
        let init = Init::new(c.seed);
        let std = c.init_std;
        let out_std = std / ((2 * c.n_layers) as f32).sqrt();
        let mut layers = Vec::with_capacity(spec.layers.len());
        for i in spec.layers.clone() {
            let prefix = format!("model.layers.{i}");
            layers.push(self.blocks[i].init_params(&init, &prefix, std, out_std)?);
        }
        let head_reads_embed = c.tie_embeddings || self.mtp.is_some();
        let embed_tokens = if spec.embed || (spec.head && head_reads_embed) {
            Some(init.randn(EMBED_NAME, &[c.vocab_size, c.d_model], std)?)
        } else {
            None
        };
        let (norm, lm_head, mtp) = if spec.head {
            let lm_head = if c.tie_embeddings {
                None
            } else {
                Some(init.randn("lm_head.weight", &[c.vocab_size, c.d_model], std)?)
            };
            let mtp = match &self.mtp {
                Some(m) => Some(m.init_params(&init, "mtp", std, out_std)?),
                None => None,
            };
            (Some(init.full(&[c.d_model], 1.0)?), lm_head, mtp)
        } else {
            (None, None, None)
        };
        Ok(ChunkParams {
            layer_offset: spec.layers.start,
            embed_tokens,
            layers,
            norm,
            lm_head,
            mtp,
        })
    }

    pub(crate) fn check_ids(arg: &'static str, x: &Tensor) -> Result<(usize, usize)> {
        match (x.dims(), x.dtype()) {
            (&[b, t], DType::I32) if b > 0 && t > 0 => Ok((b, t)),
            _ => Err(Error::Input {
                arg,
                got: x.dims().to_vec(),
                rule: "must be a non-empty [B, T] i32 tensor",
            }),
        }
    }

    /// GateSkip skip share of layer `l` at `step` (0 for layer 0 and when off).
    pub fn skip_budget(&self, l: usize, step: usize) -> f64 {
        match &self.cfg.gate_skip {
            Some(g) if l > 0 => gate_skip_budget(
                step.min(i64::MAX as usize) as i64,
                g.budget_start,
                g.budget_end,
                g.budget_warmup_steps.min(i64::MAX as usize) as i64,
            ),
            _ => 0.0,
        }
    }

    /// Forward of `ids [B, T]` against `targets [B, T]` (−100 = ignored) at optimizer step
    /// `step` (drives the GateSkip budget): the whole model as one [`ModelChunk`].
    pub fn forward(
        &self,
        p: &ModelParams,
        ids: &Tensor,
        targets: &Tensor,
        step: usize,
    ) -> Result<ModelForward> {
        let spec = ChunkSpec::whole(self.blocks.len());
        let chunk = self.chunk(spec.clone())?;
        let cp = p.split(std::slice::from_ref(&spec))?.remove(0);
        let (f, saved) = chunk.forward(&cp, ids, targets, None, step)?;
        match (f.losses, f.logits) {
            (Some(losses), Some(logits)) => Ok(ModelForward {
                losses,
                stats: f.stats,
                saved: ModelSaved { chunk: saved },
                logits,
            }),
            _ => Err(Error::Stage {
                micro_batch: None,
                rule: "the whole-model chunk produced no loss",
            }),
        }
    }

    pub(crate) fn total(
        &self,
        lm: &Tensor,
        mtp: &[Tensor],
        aux: &Tensor,
        z: &Tensor,
        gate: &Tensor,
        flexi: &Tensor,
    ) -> Result<Tensor> {
        let mut total = lm.clone();
        if let Some(m) = &self.mtp {
            for (l, w) in mtp.iter().zip(&m.cfg.step_weights) {
                total.axpy(m.cfg.mtp_loss_weight * w, l)?;
            }
        }
        if let Some(moe) = &self.cfg.moe {
            total.axpy(moe.aux_loss_weight as f32, aux)?;
            total.axpy(moe.z_loss_weight as f32, z)?;
        }
        if let Some(g) = &self.cfg.gate_skip {
            total.axpy(g.sparsity_weight as f32, gate)?;
        }
        if let Some(f) = &self.cfg.flexi_depth {
            total.axpy(f.skip_loss_weight as f32, flexi)?;
        }
        Ok(total)
    }

    /// Backward of `grad_scale · total` (grad_scale = 1/(grad_accum · chunks)); accumulates
    /// (+=) into `grads`, in place (the whole model as one [`ModelChunk`]).
    pub fn backward(
        &self,
        p: &ModelParams,
        saved: ModelSaved,
        grads: &mut ModelParams,
        grad_scale: f32,
    ) -> Result<()> {
        let spec = ChunkSpec::whole(self.blocks.len());
        let chunk = self.chunk(spec.clone())?;
        let cp = p.split(std::slice::from_ref(&spec))?.remove(0);
        // Move the gradient tensors into the chunk view and back (no copy: each handle
        // stays unique, so accumulation is in place).
        let placeholder = grads.placeholder()?;
        let mut cg = std::mem::replace(grads, placeholder).into_whole_chunk();
        let result = chunk.backward(&cp, saved.chunk, None, grad_scale, &mut cg);
        *grads = cg.into_whole_model()?;
        result.map(|_| ())
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
pub(crate) mod tests;
