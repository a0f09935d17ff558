//! Model stages: a [`ModelChunk`] runs a contiguous part of the decoder — optionally the
//! embedding, the blocks of a global layer range, optionally the final norm + LM head +
//! CE + MTP — with forward / backward_input / backward_weight per micro-batch. A pipeline
//! stage is one chunk; [`crate::Model::forward`] / [`crate::Model::backward`] are the
//! one-chunk case of the same code, so a model run as 1, 2 or 4 chunks in sequence
//! computes bit-identical losses and gradients.
//!
//! # What crosses a chunk boundary
//! Forward, a [`ChunkCarry`]: the hidden state `[N, H]` plus the running sums of the
//! losses that are reduced over all layers — MoE `aux` and `z`, the GateSkip penalty
//! (rank-0 tensors), the FlexiDepth score sum `Σ_l g_l [N]` and the layers-used
//! statistic `[N]`. Backward, a [`ChunkCarryGrad`]: `∂L/∂hidden` plus, with FlexiDepth,
//! `∂L/∂g [N]` (the same for every adaptive layer).
//!
//! # Where each loss is reduced
//! - CE and MTP: on the head chunk (it owns the logits).
//! - MoE aux / z and GateSkip: per layer; their gradient scales are per block, so each
//!   stage injects its own layers' router / gate gradients in its own backward. Only the
//!   reported VALUE is summed along the carry.
//! - FlexiDepth's coupled skip loss `mean_t (Σ_l g_l)² / n_adaptive` is NOT separable
//!   by stage: the explicit reduction point is the head chunk. The score sum travels
//!   forward in the carry; the head chunk computes the loss and `∂L/∂g`, which travels
//!   back in the carry gradient to every earlier adaptive layer.
//!
//! # Activations per micro-batch
//! [`ActivationStore`] holds each in-flight micro-batch's saved activations from its
//! forward until its `backward_input`, then its deferred weight-gradient inputs until its
//! `backward_weight` (zero-bubble schedules run W later, in any order).

use std::collections::BTreeMap;
use std::ops::Range;

use megamoe_plan::Recompute;
use megamoe_tensor::{DType, Tensor, IGNORE_INDEX};

use crate::block::{BlockCx, BlockDeferredW, BlockGradCx, BlockSaved, ResidualGrad};
use crate::chunk_params::ChunkParams;
use crate::embedding::{embedding_backward, embedding_forward};
use crate::error::{Error, Result};
use crate::ffn::FfnScale;
use crate::flexi_depth::{flexi_depth_skip_loss_grad, flexi_depth_skip_loss_of_sum};
use crate::model::Model;
use crate::mtp::{MtpDeferredW, MtpSaved, MtpShared, MtpSharedGrads};
use crate::norm::RmsNormSaved;
use crate::offload::ParkedBlock;
use crate::outputs::{LayerStats, LossParts, ModelStats};

/// Which part of the model a chunk runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpec {
    /// Global layer range.
    pub layers: Range<usize>,
    /// Runs the token embedding first (the input chunk; `layers.start == 0`).
    pub embed: bool,
    /// Ends with final norm + LM head + CE + MTP (the head chunk;
    /// `layers.end == n_layers`).
    pub head: bool,
}

impl ChunkSpec {
    /// The whole model as one chunk.
    pub fn whole(n_layers: usize) -> ChunkSpec {
        ChunkSpec {
            layers: 0..n_layers,
            embed: true,
            head: true,
        }
    }

    /// `chunks` consecutive chunks of `n_layers` layers, as even as possible (the first
    /// `n_layers % chunks` chunks get one more layer).
    pub fn even(n_layers: usize, chunks: usize) -> Result<Vec<ChunkSpec>> {
        if chunks == 0 || chunks > n_layers.max(1) {
            return Err(Error::Stage {
                micro_batch: None,
                rule: "the number of chunks must be between 1 and the number of layers",
            });
        }
        let (per, extra) = (n_layers / chunks, n_layers % chunks);
        let mut start = 0;
        Ok((0..chunks)
            .map(|c| {
                let len = per + usize::from(c < extra);
                let spec = ChunkSpec {
                    layers: start..start + len,
                    embed: c == 0,
                    head: c + 1 == chunks,
                };
                start += len;
                spec
            })
            .collect())
    }

    /// Checks that `specs`, in order, tile a model of `n_layers` layers: consecutive
    /// ranges from 0 to `n_layers`, the embedding on the first chunk only, the head on the
    /// last only.
    pub fn validate_tiling(specs: &[ChunkSpec], n_layers: usize) -> Result<()> {
        let bad = |rule| {
            Err(Error::Stage {
                micro_batch: None,
                rule,
            })
        };
        if specs.is_empty() {
            return bad("at least one chunk is needed");
        }
        let mut next = 0;
        for (i, s) in specs.iter().enumerate() {
            if s.layers.start != next || s.layers.end < s.layers.start {
                return bad("chunk layer ranges must be consecutive and ascending");
            }
            if s.embed != (i == 0) || s.head != (i + 1 == specs.len()) {
                return bad("the embedding belongs to the first chunk and the head to the last");
            }
            next = s.layers.end;
        }
        if next != n_layers {
            return bad("the chunks must cover every layer");
        }
        Ok(())
    }
}

/// What a chunk hands to the next one in forward (the pipeline's p2p payload).
#[derive(Debug, Clone)]
pub struct ChunkCarry {
    /// Hidden state `[N, H]`.
    pub hidden: Tensor,
    /// Running Σ of the MoE balancing losses (rank 0).
    pub aux: Tensor,
    /// Running Σ of the MoE z-losses (rank 0).
    pub z: Tensor,
    /// Running Σ of the GateSkip penalties (rank 0).
    pub gate_penalty: Tensor,
    /// FlexiDepth running score sum `Σ_l g_l [N]` (`None` before the first adaptive layer).
    pub depth_sum: Option<Tensor>,
    /// FlexiDepth layers used per token `[N]` (statistic).
    pub layers_used: Option<Tensor>,
}

/// What a chunk hands to the previous one in backward.
#[derive(Debug, Clone)]
pub struct ChunkCarryGrad {
    /// `∂L/∂hidden [N, H]`.
    pub d_hidden: Tensor,
    /// FlexiDepth `∂L/∂g_l [N]` (the same for every adaptive layer).
    pub d_depth: Option<Tensor>,
}

/// What one chunk forward returns besides its saved activations.
#[derive(Debug)]
pub struct ChunkForward {
    /// Input of the next chunk (`None` on the head chunk).
    pub carry: Option<ChunkCarry>,
    /// Loss parts (head chunk only).
    pub losses: Option<LossParts>,
    /// `[N, V]` logits (head chunk only).
    pub logits: Option<Tensor>,
    /// Statistics of this chunk's layers (global indices); `layers_used` on the head
    /// chunk only.
    pub stats: ModelStats,
}

/// A block's saved state: full activations, or only its input (recomputed in backward).
#[derive(Debug)]
enum SavedBlock {
    /// The saved state, and its activations parked in host memory (`train.offload`).
    Kept(Box<BlockSaved>, Option<ParkedBlock>),
    Recompute(Tensor),
}

#[derive(Debug)]
struct HeadSaved {
    final_norm: RmsNormSaved,
    hf: Tensor,
    /// ∂lm_loss/∂logits (unscaled).
    d_logits: Tensor,
    mtp: Option<MtpSaved>,
    /// FlexiDepth Σ_l g_l `[N]`.
    depth_sum: Option<Tensor>,
}

/// The activation store of one chunk forward (one micro-batch); consumed by
/// [`ModelChunk::backward_input`].
#[derive(Debug)]
pub struct ChunkSaved {
    b: usize,
    t: usize,
    /// Flat ids (input chunk).
    ids: Option<Tensor>,
    budgets: Vec<f64>,
    never_skip: Option<Tensor>,
    blocks: Vec<SavedBlock>,
    head: Option<HeadSaved>,
}

#[derive(Debug)]
struct HeadDeferredW {
    /// Scaled ∂L/∂logits `[N, V]` and the head input `hf [N, H]`.
    d_logits: Tensor,
    hf: Tensor,
    /// Upstream gradient of the final norm and its saved input.
    d_hf: Tensor,
    final_norm: RmsNormSaved,
    mtp: Option<MtpDeferredW>,
}

/// What [`ModelChunk::backward_weight`] needs (moved by value).
#[derive(Debug)]
pub struct ChunkDeferredW {
    head: Option<HeadDeferredW>,
    /// (local block index, deferred W), last block first.
    blocks: Vec<(usize, BlockDeferredW)>,
    /// Input chunk: flat ids and ∂L/∂embedding-output.
    embed: Option<(Tensor, Tensor)>,
}

/// One chunk of a [`Model`] (borrows the model's layers; stateless: parameters and
/// activations are passed in).
#[derive(Debug, Clone)]
pub struct ModelChunk<'m> {
    model: &'m Model,
    spec: ChunkSpec,
}

impl Model {
    /// The chunk `spec` of this model. Errors name the broken rule (a range past the last
    /// layer, an embedding not at layer 0, a head not after the last layer).
    pub fn chunk(&self, spec: ChunkSpec) -> Result<ModelChunk<'_>> {
        let n = self.blocks.len();
        let rule = if spec.layers.end > n || spec.layers.start > spec.layers.end {
            Some("the layer range must lie inside 0..n_layers")
        } else if spec.embed && spec.layers.start != 0 {
            Some("the embedding chunk must start at layer 0")
        } else if spec.head && spec.layers.end != n {
            Some("the head chunk must end at the last layer")
        } else {
            None
        };
        match rule {
            Some(rule) => Err(Error::Stage {
                micro_batch: None,
                rule,
            }),
            None => Ok(ModelChunk { model: self, spec }),
        }
    }

    /// Number of FlexiDepth adaptive layers of the whole model.
    fn adaptive_layers(&self) -> usize {
        self.blocks
            .iter()
            .filter(|b| b.flexi_depth.is_some())
            .count()
    }
}

fn stage_err(micro_batch: Option<usize>, rule: &'static str) -> Error {
    Error::Stage { micro_batch, rule }
}

impl ModelChunk<'_> {
    /// This chunk's spec.
    pub fn spec(&self) -> &ChunkSpec {
        &self.spec
    }

    fn check_params(&self, p: &ChunkParams) -> Result<()> {
        if p.layer_offset != self.spec.layers.start || p.layers.len() != self.spec.layers.len() {
            return Err(stage_err(
                None,
                "the parameters do not hold this chunk's layers",
            ));
        }
        Ok(())
    }

    fn blocks(&self) -> &[crate::block::Block] {
        &self.model.blocks[self.spec.layers.clone()]
    }

    /// Forward of one micro-batch: `ids`, `targets [B, T]` (every chunk reads `targets`
    /// for GateSkip's never-skip mask; the input and head chunks read `ids`), `carry` from
    /// the previous chunk (`None` on the input chunk), optimizer step `step`.
    pub fn forward(
        &self,
        p: &ChunkParams,
        ids: &Tensor,
        targets: &Tensor,
        carry: Option<ChunkCarry>,
        step: usize,
    ) -> Result<(ChunkForward, ChunkSaved)> {
        let model = self.model;
        let cfg = &model.cfg;
        self.check_params(p)?;
        let (b, t) = Model::check_ids("ids", ids)?;
        if Model::check_ids("targets", targets)? != (b, t) {
            return Err(Error::Input {
                arg: "targets",
                got: targets.dims().to_vec(),
                rule: "must have the shape of ids",
            });
        }
        let n = b * t;
        let dev = ids.device();
        let never_skip = match &cfg.gate_skip {
            Some(_) => Some(targets.reshape([n])?.eq_scalar(IGNORE_INDEX as f32)?),
            None => None,
        };
        let budgets: Vec<f64> = self
            .spec
            .layers
            .clone()
            .map(|l| model.skip_budget(l, step))
            .collect();
        let zero = Tensor::scalar(0.0, dev)?;
        let n_adaptive = model.adaptive_layers();
        let (mut c, ids_flat) = match (self.spec.embed, carry) {
            (true, None) => {
                let ids_flat = ids.reshape([n])?;
                // sequence parallel: each TP rank keeps its shard of the whole embedding
                let hidden = model.seq_shard(embedding_forward(p.embed()?, &ids_flat)?, b)?;
                let layers_used = if n_adaptive > 0 {
                    let fixed = (model.blocks.len() - n_adaptive) as f32;
                    Some(Tensor::full([n], fixed, DType::F32, dev)?)
                } else {
                    None
                };
                let carry = ChunkCarry {
                    hidden,
                    aux: zero.clone(),
                    z: zero.clone(),
                    gate_penalty: zero.clone(),
                    depth_sum: None,
                    layers_used,
                };
                (carry, Some(ids_flat))
            }
            (false, Some(c)) => {
                if c.hidden.dims() != [model.hidden_rows(b, t)?, cfg.d_model] {
                    return Err(Error::Input {
                        arg: "carry.hidden",
                        got: c.hidden.dims().to_vec(),
                        rule: "must be [B·T, d_model] for this micro-batch ([B·T/tp, \
                               d_model] under sequence parallelism)",
                    });
                }
                (c, None)
            }
            (true, Some(_)) => return Err(stage_err(None, "the input chunk takes no carry")),
            (false, None) => {
                return Err(stage_err(
                    None,
                    "a chunk after the first needs the previous chunk's carry",
                ))
            }
        };
        let mut saved_blocks = Vec::with_capacity(self.spec.layers.len());
        let mut stats = Vec::with_capacity(self.spec.layers.len());
        for (i, (block, bp)) in self.blocks().iter().zip(&p.layers).enumerate() {
            let cx = BlockCx {
                b,
                t,
                skip_budget: budgets[i],
                never_skip: never_skip.as_ref(),
            };
            let bp = model.block_params(block.layer, bp)?;
            if let Some(next) = self.blocks().get(i + 1) {
                model.prefetch_block(next.layer, p.layers.get(i + 1))?;
            }
            let (y, out, s) = block.forward(&bp, &c.hidden, &cx)?;
            drop(bp);
            let x = std::mem::replace(&mut c.hidden, y);
            saved_blocks.push(match cfg.recompute {
                Recompute::Full => SavedBlock::Recompute(x),
                Recompute::None | Recompute::Selective => {
                    let mut s = s;
                    let parked = if cfg.offload.is_empty() {
                        None
                    } else {
                        Some(ParkedBlock::park(&mut s, cfg.offload)?)
                    };
                    SavedBlock::Kept(Box::new(s), parked)
                }
            });
            if let Some(m) = &out.moe {
                c.aux = c.aux.add(&m.aux_loss)?;
                c.z = c.z.add(&m.z_loss)?;
            }
            if let Some(gp) = &out.gate_penalty {
                c.gate_penalty = c.gate_penalty.add(gp)?;
            }
            if let (Some(g), Some(m)) = (&out.depth_score, &out.full_path) {
                c.depth_sum = Some(match c.depth_sum.take() {
                    None => g.clone(),
                    Some(sum) => sum.add(g)?,
                });
                if let Some(u) = &mut c.layers_used {
                    u.add_assign(m)?;
                }
            }
            stats.push(LayerStats {
                layer: block.layer,
                block: out,
            });
        }
        let mut saved = ChunkSaved {
            b,
            t,
            ids: ids_flat,
            budgets,
            never_skip,
            blocks: saved_blocks,
            head: None,
        };
        if !self.spec.head {
            let fwd = ChunkForward {
                carry: Some(c),
                losses: None,
                logits: None,
                stats: ModelStats {
                    layers: stats,
                    layers_used: None,
                },
            };
            return Ok((fwd, saved));
        }
        // Head: the reduction point of every loss.
        // Mean over gated modules (two per layer of the whole model).
        let gate_skip = c
            .gate_penalty
            .scale(1.0 / (2 * model.blocks.len()) as f32)?;
        let flexi_depth = match &c.depth_sum {
            Some(sum) => flexi_depth_skip_loss_of_sum(sum, n_adaptive)?,
            None => zero.clone(),
        };
        let norm_w = p.final_norm()?;
        let (hf, final_norm) = model.norm.forward(&c.hidden, Some(norm_w))?;
        // sequence parallel: the head, CE and MTP read the whole sequence
        let hf = model.seq_gather(hf, b)?;
        let head = p.head()?;
        let logits = hf.matmul(head, false, true)?;
        let (lm_loss, d_logits) = logits.cross_entropy(&targets.reshape([n])?, IGNORE_INDEX)?;
        let (mtp_losses, mtp_saved) = match (&model.mtp, &p.mtp) {
            (Some(m), Some(mp)) => {
                let shared = MtpShared {
                    embed: p.embed()?,
                    head,
                    norm: norm_w,
                };
                let (l, s) = m.forward(mp, &hf, ids, targets, shared)?;
                (l, Some(s))
            }
            (None, _) => (Vec::new(), None),
            (Some(_), None) => {
                return Err(stage_err(None, "the head chunk needs the mtp.* weights"))
            }
        };
        let total = model.total(
            &lm_loss,
            &mtp_losses,
            &c.aux,
            &c.z,
            &gate_skip,
            &flexi_depth,
        )?;
        saved.head = Some(HeadSaved {
            final_norm,
            hf,
            d_logits,
            mtp: mtp_saved,
            depth_sum: c.depth_sum,
        });
        let fwd = ChunkForward {
            carry: None,
            losses: Some(LossParts {
                lm_loss,
                mtp_losses,
                aux: c.aux,
                z: c.z,
                gate_skip,
                flexi_depth,
                total,
            }),
            logits: Some(logits),
            stats: ModelStats {
                layers: stats,
                layers_used: c.layers_used,
            },
        };
        Ok((fwd, saved))
    }

    /// Input half of the backward of `grad_scale · total` for one micro-batch: the head
    /// chunk starts from its own loss (`d_out = None`), every other chunk from the next
    /// chunk's [`ChunkCarryGrad`]. Returns the gradient for the previous chunk (`None` on
    /// the input chunk) and the deferred weight-gradient inputs.
    pub fn backward_input(
        &self,
        p: &ChunkParams,
        saved: ChunkSaved,
        d_out: Option<ChunkCarryGrad>,
        grad_scale: f32,
    ) -> Result<(Option<ChunkCarryGrad>, ChunkDeferredW)> {
        let model = self.model;
        let cfg = &model.cfg;
        self.check_params(p)?;
        let s = saved;
        let (b, t) = (s.b, s.t);
        if s.blocks.len() != self.spec.layers.len() {
            return Err(stage_err(
                None,
                "the saved activations belong to another chunk",
            ));
        }
        let (d_x, d_depth, head_w) = match (s.head, d_out) {
            (Some(h), None) => {
                let head = p.head()?;
                let norm_w = p.final_norm()?;
                // One micro-batch (scale 1): the logit gradient as is, not a pass over
                // [N, V] multiplying by one (x·1 = x for every float but NaN payloads).
                let d_logits = if grad_scale == 1.0 {
                    h.d_logits
                } else {
                    h.d_logits.scale(grad_scale)?
                };
                let mut d_hf = d_logits.matmul(head, false, false)?;
                let mtp = match (&model.mtp, &p.mtp, h.mtp) {
                    (Some(m), Some(mp), Some(ms)) => {
                        let shared = MtpShared {
                            embed: p.embed()?,
                            head,
                            norm: norm_w,
                        };
                        let (d_h0, w) = m.backward_input(mp, ms, shared, grad_scale)?;
                        d_hf.add_assign(&d_h0)?;
                        Some(w)
                    }
                    _ => None,
                };
                // sequence parallel: the final norm ran on this rank's shard
                let d_hf = model.seq_shard(d_hf, b)?;
                let d_x = model
                    .norm
                    .backward(&d_hf, Some(norm_w), &h.final_norm, None)?;
                let d_depth = match (&cfg.flexi_depth, &h.depth_sum) {
                    (Some(f), Some(sum)) => Some(flexi_depth_skip_loss_grad(
                        sum,
                        model.adaptive_layers(),
                        f.skip_loss_weight as f32 * grad_scale,
                    )?),
                    _ => None,
                };
                let w = HeadDeferredW {
                    d_logits,
                    hf: h.hf,
                    d_hf,
                    final_norm: h.final_norm,
                    mtp,
                };
                (d_x, d_depth, Some(w))
            }
            (None, Some(g)) => {
                if g.d_hidden.dims() != [model.hidden_rows(b, t)?, cfg.d_model] {
                    return Err(Error::Input {
                        arg: "d_out.d_hidden",
                        got: g.d_hidden.dims().to_vec(),
                        rule: "must be [B·T, d_model] for this micro-batch ([B·T/tp, \
                               d_model] under sequence parallelism)",
                    });
                }
                (g.d_hidden, g.d_depth, None)
            }
            (Some(_), Some(_)) => {
                return Err(stage_err(
                    None,
                    "the head chunk's gradient comes from its own loss (pass None)",
                ))
            }
            (None, None) => {
                return Err(stage_err(
                    None,
                    "a chunk before the head needs the next chunk's gradient",
                ))
            }
        };
        // Per-block gradient scales: every loss weight and the micro-batch scale once.
        let gate_penalty = match &cfg.gate_skip {
            Some(g) => g.sparsity_weight as f32 * grad_scale / (2 * model.blocks.len()) as f32,
            None => 0.0,
        };
        let ffn = match &cfg.moe {
            Some(m) => FfnScale {
                aux: m.aux_loss_weight as f32 * grad_scale,
                z: m.z_loss_weight as f32 * grad_scale,
            },
            None => FfnScale::default(),
        };
        let blocks = self.blocks();
        // The residual gradient between blocks, with its activation-dtype copy.
        let mut d_res = ResidualGrad {
            sum: d_x.clone(),
            act: d_x,
        };
        let mut deferred = Vec::with_capacity(blocks.len());
        let mut pending = s.blocks;
        while let Some(sb) = pending.pop() {
            let i = pending.len();
            // Offloaded activations of the next block down start coming back now, behind
            // this block's backward.
            if let Some(SavedBlock::Kept(_, Some(next))) = pending.last_mut() {
                next.prefetch()?;
            }
            let block = &blocks[i];
            let bp = model.block_params(block.layer, &p.layers[i])?;
            if let Some(prev) = i.checked_sub(1) {
                model.prefetch_block(blocks[prev].layer, p.layers.get(prev))?;
            }
            let bs = match sb {
                SavedBlock::Kept(mut bs, parked) => {
                    if let Some(p) = parked {
                        p.restore(&mut bs, cfg.offload)?;
                    }
                    *bs
                }
                SavedBlock::Recompute(x) => {
                    let cx = BlockCx {
                        b,
                        t,
                        skip_budget: s.budgets[i],
                        never_skip: s.never_skip.as_ref(),
                    };
                    block.forward(&bp, &x, &cx)?.2
                }
            };
            let gcx = BlockGradCx {
                gate_penalty,
                d_depth_score: if block.flexi_depth.is_some() {
                    d_depth.clone()
                } else {
                    None
                },
                ffn,
            };
            let (d, w) = block.backward_input_residual(&bp, &d_res, bs, &gcx)?;
            drop(bp);
            d_res = d;
            deferred.push((i, w));
        }
        let d_x = d_res.sum;
        let (up, embed) = match s.ids {
            // sequence parallel: the embedding's gradient from every rank's shard
            Some(ids) => (None, Some((ids, model.seq_gather(d_x, b)?))),
            None => (
                Some(ChunkCarryGrad {
                    d_hidden: d_x,
                    d_depth,
                }),
                None,
            ),
        };
        let w = ChunkDeferredW {
            head: head_w,
            blocks: deferred,
            embed,
        };
        Ok((up, w))
    }

    /// Weight half: accumulates (+=) every weight gradient of the micro-batch into `g`
    /// (head, MTP and final norm, then the blocks last to first, then the embedding).
    pub fn backward_weight(&self, w: ChunkDeferredW, g: &mut ChunkParams) -> Result<()> {
        self.check_params(g)?;
        if let Some(h) = w.head {
            match g.lm_head.as_mut() {
                Some(hg) => hg.matmul_acc(&h.d_logits, &h.hf, true, false, 1.0)?,
                None => g
                    .embed_mut()?
                    .matmul_acc(&h.d_logits, &h.hf, true, false, 1.0)?,
            }
            if let (Some(m), Some(mw)) = (&self.model.mtp, h.mtp) {
                let ChunkParams {
                    embed_tokens,
                    norm,
                    lm_head,
                    mtp,
                    ..
                } = g;
                let missing = || {
                    stage_err(
                        None,
                        "the head chunk's gradients need mtp.*, the embedding and the final norm",
                    )
                };
                let sg = MtpSharedGrads {
                    embed: embed_tokens.as_mut().ok_or_else(missing)?,
                    head: lm_head.as_mut(),
                    norm: norm.as_mut().ok_or_else(missing)?,
                };
                m.backward_weight(mw, mtp.as_mut().ok_or_else(missing)?, sg)?;
            }
            let d_norm = h
                .d_hf
                .rms_norm_backward_weight(&h.final_norm.x, &h.final_norm.rstd)?;
            // sequence parallel: the final norm saw this rank's shard only
            let d_norm = self.model.seq_sum(d_norm)?;
            match g.norm.as_mut() {
                Some(n) => n.add_assign(&d_norm)?,
                None => return Err(stage_err(None, "the head chunk needs model.norm.weight")),
            }
        }
        let blocks = self.blocks();
        for (i, bw) in w.blocks {
            blocks[i].backward_weight(bw, &mut g.layers[i])?;
            self.model.block_grads_done(blocks[i].layer, &g.layers[i])?;
        }
        if let Some((ids, d_x)) = w.embed {
            embedding_backward(g.embed_mut()?, &ids, &d_x)?;
        }
        Ok(())
    }

    /// `backward_input` then `backward_weight`; returns the gradient for the previous
    /// chunk.
    pub fn backward(
        &self,
        p: &ChunkParams,
        saved: ChunkSaved,
        d_out: Option<ChunkCarryGrad>,
        grad_scale: f32,
        g: &mut ChunkParams,
    ) -> Result<Option<ChunkCarryGrad>> {
        let (up, w) = self.backward_input(p, saved, d_out, grad_scale)?;
        self.backward_weight(w, g)?;
        Ok(up)
    }

    /// [`ModelChunk::forward`] of micro-batch `mb`, its activations kept in `store`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_micro_batch(
        &self,
        store: &mut ActivationStore,
        mb: usize,
        p: &ChunkParams,
        ids: &Tensor,
        targets: &Tensor,
        carry: Option<ChunkCarry>,
        step: usize,
    ) -> Result<ChunkForward> {
        if store.saved.contains_key(&mb) || store.deferred.contains_key(&mb) {
            return Err(stage_err(
                Some(mb),
                "forward ran again before its backward finished",
            ));
        }
        let (fwd, saved) = self.forward(p, ids, targets, carry, step)?;
        store.saved.insert(mb, saved);
        Ok(fwd)
    }

    /// [`ModelChunk::backward_input`] of micro-batch `mb`: consumes its saved activations
    /// and keeps its deferred weight-gradient inputs in `store`.
    pub fn backward_input_micro_batch(
        &self,
        store: &mut ActivationStore,
        mb: usize,
        p: &ChunkParams,
        d_out: Option<ChunkCarryGrad>,
        grad_scale: f32,
    ) -> Result<Option<ChunkCarryGrad>> {
        let saved = store
            .saved
            .remove(&mb)
            .ok_or_else(|| stage_err(Some(mb), "backward_input without a stored forward"))?;
        let (up, w) = self.backward_input(p, saved, d_out, grad_scale)?;
        store.deferred.insert(mb, w);
        Ok(up)
    }

    /// [`ModelChunk::backward_weight`] of micro-batch `mb` (after its `backward_input`).
    pub fn backward_weight_micro_batch(
        &self,
        store: &mut ActivationStore,
        mb: usize,
        g: &mut ChunkParams,
    ) -> Result<()> {
        let w = store
            .deferred
            .remove(&mb)
            .ok_or_else(|| stage_err(Some(mb), "backward_weight without a backward_input"))?;
        self.backward_weight(w, g)
    }
}

/// Per-micro-batch activations of one chunk: saved by forward until `backward_input`,
/// then deferred weight-gradient inputs until `backward_weight`.
#[derive(Debug, Default)]
pub struct ActivationStore {
    saved: BTreeMap<usize, ChunkSaved>,
    deferred: BTreeMap<usize, ChunkDeferredW>,
}

impl ActivationStore {
    /// An empty store.
    pub fn new() -> ActivationStore {
        ActivationStore::default()
    }

    /// Micro-batches whose forward ran and whose `backward_input` has not.
    pub fn awaiting_input_grad(&self) -> Vec<usize> {
        self.saved.keys().copied().collect()
    }

    /// Micro-batches whose `backward_input` ran and whose `backward_weight` has not.
    pub fn awaiting_weight_grad(&self) -> Vec<usize> {
        self.deferred.keys().copied().collect()
    }

    /// Nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.saved.is_empty() && self.deferred.is_empty()
    }

    /// Bytes of the residual-stream activations the forwards awaiting their
    /// `backward_input` keep: every kept block's norm inputs and `1/rms`, the inputs of the
    /// blocks to recompute and the final norm's (this rank's shard under sequence
    /// parallelism).
    pub fn residual_stream_bytes(&self) -> u64 {
        use crate::block::tensor_bytes;
        let mut bytes = 0;
        for s in self.saved.values() {
            for b in &s.blocks {
                bytes += match b {
                    SavedBlock::Kept(b, _) => b.residual_stream_bytes(),
                    SavedBlock::Recompute(x) => tensor_bytes(x),
                };
            }
            if let Some(h) = &s.head {
                bytes += tensor_bytes(&h.final_norm.x) + tensor_bytes(&h.final_norm.rstd);
            }
        }
        bytes
    }
}

#[cfg(test)]
#[path = "chunk_tests.rs"]
mod tests;
