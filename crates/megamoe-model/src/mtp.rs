//! Multi-token prediction (FastMTP shared block, arXiv 2509.18362; DeepSeek-V3 §2.2 sequential
//! modules as an option). Seed `mtp_shared_block_sample.py`.
//!
//! `h⁰` is the main model's final hidden state AFTER the final norm `[N, H]`. For depth
//! `k = 1..K`:
//! ```text
//! e_k = Emb(ids rolled left by k; tail filled with token 0)
//! u_k = [RMSNorm(h^{k−1}); RMSNorm(e_k)] W_projᵀ      W_proj [H, 2H]; order configurable
//! h^k = Block_j(u_k)                                   plain block: attention + dense FFN
//! CE_k = CE(RMSNorm_final(h^k) W_headᵀ, targets rolled left by k, tail = −100)
//! L_MTP = λ Σ_k w_k CE_k,   w_k = β^{k−1} / Σ_j β^j   (k = 1..K; [0.5102, 0.3061, 0.1837])
//! ```
//! `j = 0` for every depth in shared mode, `j = k−1` in sequential mode. The two input
//! RMSNorms carry no weight ("learnable norm off", seed default). Embedding, final norm and
//! head are the main model's (shared): their gradients are accumulated into the caller's
//! buffers.
//!
//! Ignore index: we use −100 (PyTorch's `cross_entropy` default, the same constant as the
//! main LM loss) rather than the seed's −1, so one `IGNORE_INDEX` serves every loss.
//! Each CE_k is normalised by its own valid-token count (T−k per sequence when nothing else
//! is ignored). Document boundaries inside packed sequences are not tracked (the data
//! pipeline gives none); a target already −100 stays ignored after rolling.

use megamoe_optim::ParamRole;
use megamoe_plan::{ConcatOrder, MtpMode};
use megamoe_tensor::{DType, Tensor, IGNORE_INDEX};

use crate::block::{Block, BlockCx, BlockDeferredW, BlockGradCx, BlockParams, BlockSaved};
use crate::embedding::{embedding_backward, embedding_forward};
use crate::error::{Error, Result};
use crate::init::Init;
use crate::norm::{RmsNorm, RmsNormSaved};

/// MTP settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MtpConfig {
    /// K depths.
    pub mtp_depth: usize,
    /// Shared block or one module per depth.
    pub mode: MtpMode,
    /// w_k, k = 1..K (from `megamoe_plan::mtp_step_weights`).
    pub step_weights: Vec<f32>,
    /// λ.
    pub mtp_loss_weight: f32,
    /// Concat order of the input projection.
    pub concat_order: ConcatOrder,
}

impl MtpConfig {
    /// Number of MTP modules: 1 (shared) or K (sequential).
    pub fn modules(&self) -> usize {
        match self.mode {
            MtpMode::Shared => 1,
            MtpMode::Sequential => self.mtp_depth,
        }
    }
}

/// One MTP module's weights.
#[derive(Debug, Clone)]
pub struct MtpLayerParams {
    /// `W_proj [H, 2H]`.
    pub input_proj: Tensor,
    /// The plain block.
    pub block: BlockParams,
}

/// All MTP weights: `mtp.layers.{j}.input_proj.weight`, `mtp.layers.{j}.<block>`.
#[derive(Debug, Clone)]
pub struct MtpParams {
    /// One (shared) or K (sequential) modules.
    pub layers: Vec<MtpLayerParams>,
}

impl MtpParams {
    /// Names under `prefix` (`mtp`).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        for (j, l) in self.layers.iter().enumerate() {
            let pre = format!("{prefix}.layers.{j}");
            f(
                &format!("{pre}.input_proj.weight"),
                &l.input_proj,
                ParamRole::Matrix,
            );
            l.block.visit(&pre, f);
        }
    }

    /// Mutable twin of [`MtpParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        for (j, l) in self.layers.iter_mut().enumerate() {
            let pre = format!("{prefix}.layers.{j}");
            f(
                &format!("{pre}.input_proj.weight"),
                &mut l.input_proj,
                ParamRole::Matrix,
            );
            l.block.visit_mut(&pre, f);
        }
    }
}

/// The main model's weights that MTP shares.
#[derive(Debug, Clone, Copy)]
pub struct MtpShared<'a> {
    /// Embedding `[V, H]`.
    pub embed: &'a Tensor,
    /// LM head `[V, H]` (the embedding when tied).
    pub head: &'a Tensor,
    /// Final norm weight `[H]`.
    pub norm: &'a Tensor,
}

/// Gradient buffers of the shared weights (accumulated +=).
#[derive(Debug)]
pub struct MtpSharedGrads<'a> {
    /// `[V, H]`.
    pub embed: &'a mut Tensor,
    /// `[V, H]`; `None` when the head is tied to the embedding (its gradient goes to
    /// `embed`).
    pub head: Option<&'a mut Tensor>,
    /// `[H]`.
    pub norm: &'a mut Tensor,
}

/// What one depth's weight-gradient pass needs (moved by value).
#[derive(Debug)]
struct DepthDeferredW {
    /// Module index `j`.
    module: usize,
    /// Scaled `∂L/∂logits [N, V]` and the head input `hf [N, H]`.
    d_logits: Tensor,
    hf: Tensor,
    /// Upstream gradient of the final norm and its saved input.
    d_hf: Tensor,
    final_norm: RmsNormSaved,
    block: BlockDeferredW,
    /// Input-projection gradient parts.
    d_u: Tensor,
    cat: Tensor,
    /// Rolled ids and the gradient of their embedding rows.
    ids: Tensor,
    d_e: Tensor,
}

/// What MTP's `backward_weight` needs (moved by value), deepest depth first.
#[derive(Debug)]
pub struct MtpDeferredW {
    depths: Vec<DepthDeferredW>,
}

#[derive(Debug)]
struct DepthSaved {
    ids: Tensor,
    hn: RmsNormSaved,
    en: RmsNormSaved,
    cat: Tensor,
    block: BlockSaved,
    final_norm: RmsNormSaved,
    hf: Tensor,
    /// ∂CE_k/∂logits (unscaled).
    d_logits: Tensor,
}

/// What MTP's backward needs (moved by value).
#[derive(Debug)]
pub struct MtpSaved {
    b: usize,
    t: usize,
    depths: Vec<DepthSaved>,
}

/// The MTP head.
#[derive(Debug, Clone)]
pub struct MtpHead {
    /// Settings.
    pub cfg: MtpConfig,
    /// The plain block (layer index only names it).
    pub block: Block,
    /// Norm ε.
    pub norm: RmsNorm,
}

/// `x [B, T]` rolled left by `k` along T, tail filled with `fill` (i32), flattened to `[B·T]`.
pub fn roll_left(x: &Tensor, k: usize, fill: i32) -> Result<Tensor> {
    let (b, t) = x.dims2()?;
    let tail = Tensor::full([b, k.min(t)], fill as f32, DType::I32, x.device())?;
    if k >= t {
        return Ok(tail.reshape([b * t])?);
    }
    Ok(Tensor::cat(&[&x.narrow(1, k, t - k)?, &tail], 1)?.reshape([b * t])?)
}

impl MtpHead {
    /// Checks the config against the block.
    pub fn new(cfg: MtpConfig, block: Block, norm: RmsNorm) -> Result<MtpHead> {
        if cfg.mtp_depth == 0 || cfg.step_weights.len() != cfg.mtp_depth {
            return Err(Error::Config {
                field: "mtp.depth",
                value: cfg.mtp_depth.to_string(),
                rule: "must be >= 1 with one step weight per depth",
            });
        }
        if block.gate_skip.is_some() || block.flexi_depth.is_some() {
            return Err(Error::Config {
                field: "mtp block",
                value: "gated".into(),
                rule: "the MTP block is a plain block (no MoE, no skip)",
            });
        }
        Ok(MtpHead { cfg, block, norm })
    }

    /// Fresh weights: `mtp.layers.{j}.*`.
    pub fn init_params(
        &self,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<MtpParams> {
        let h = self.block.attn.cfg.d_model;
        let mut layers = Vec::new();
        for j in 0..self.cfg.modules() {
            let pre = format!("{prefix}.layers.{j}");
            layers.push(MtpLayerParams {
                input_proj: init.randn(&format!("{pre}.input_proj.weight"), &[h, 2 * h], std)?,
                block: self.block.init_params(init, &pre, std, out_std)?,
            });
        }
        Ok(MtpParams { layers })
    }

    fn module(&self, k: usize) -> usize {
        match self.cfg.mode {
            MtpMode::Shared => 0,
            MtpMode::Sequential => k - 1,
        }
    }

    /// `h0 [N, H]` (post final norm), `ids`/`targets [B, T]` → unweighted `CE_k` for
    /// k = 1..K and the saved state.
    pub fn forward(
        &self,
        p: &MtpParams,
        h0: &Tensor,
        ids: &Tensor,
        targets: &Tensor,
        shared: MtpShared<'_>,
    ) -> Result<(Vec<Tensor>, MtpSaved)> {
        let (b, t) = ids.dims2()?;
        let cx = BlockCx {
            b,
            t,
            skip_budget: 0.0,
            never_skip: None,
        };
        let mut h = h0.clone();
        let mut losses = Vec::new();
        let mut depths = Vec::new();
        for k in 1..=self.cfg.mtp_depth {
            let lp = &p.layers[self.module(k)];
            let ids_k = roll_left(ids, k, 0)?;
            let tgt_k = roll_left(targets, k, IGNORE_INDEX)?;
            let e = embedding_forward(shared.embed, &ids_k)?;
            let (hn_t, hn) = self.norm.forward(&h, None)?;
            let (en_t, en) = self.norm.forward(&e, None)?;
            let cat = match self.cfg.concat_order {
                ConcatOrder::HiddenFirst => Tensor::cat(&[&hn_t, &en_t], 1)?,
                ConcatOrder::EmbeddingFirst => Tensor::cat(&[&en_t, &hn_t], 1)?,
            };
            let u = cat.matmul(&lp.input_proj, false, true)?;
            let (hk, _, block) = self.block.forward(&lp.block, &u, &cx)?;
            let (hf, final_norm) = self.norm.forward(&hk, Some(shared.norm))?;
            let logits = hf.matmul(shared.head, false, true)?;
            let (ce, d_logits) = logits.cross_entropy(&tgt_k, IGNORE_INDEX)?;
            losses.push(ce);
            depths.push(DepthSaved {
                ids: ids_k,
                hn,
                en,
                cat,
                block,
                final_norm,
                hf,
                d_logits,
            });
            h = hk;
        }
        Ok((losses, MtpSaved { b, t, depths }))
    }

    /// Input half of the backward of `grad_scale · λ Σ w_k CE_k`: returns `d h⁰ [N, H]`
    /// (fresh) and the deferred weight gradients (every MTP weight and the shared
    /// embedding, head and final-norm contributions).
    pub fn backward_input(
        &self,
        p: &MtpParams,
        s: MtpSaved,
        shared: MtpShared<'_>,
        grad_scale: f32,
    ) -> Result<(Tensor, MtpDeferredW)> {
        let h = self.block.attn.cfg.d_model;
        let n = s.b * s.t;
        let mut carry = Tensor::zeros([n, h], DType::F32, shared.embed.device())?;
        let gcx = BlockGradCx::default();
        let mut deferred = Vec::with_capacity(s.depths.len());
        for (i, ds) in s.depths.into_iter().enumerate().rev() {
            let k = i + 1;
            let j = self.module(k);
            let lp = &p.layers[j];
            let w = grad_scale * self.cfg.mtp_loss_weight * self.cfg.step_weights[i];
            let d_logits = ds.d_logits.scale(w)?;
            let d_hf = d_logits.matmul(shared.head, false, false)?;
            let mut d_hk = self
                .norm
                .backward(&d_hf, Some(shared.norm), &ds.final_norm, None)?;
            d_hk.add_assign(&carry)?;
            let (d_u, block) = self
                .block
                .backward_input(&lp.block, &d_hk, ds.block, &gcx)?;
            let d_cat = d_u.matmul(&lp.input_proj, false, false)?;
            let parts = d_cat.split(1, &[h, h])?;
            let (d_hn, d_en) = match self.cfg.concat_order {
                ConcatOrder::HiddenFirst => (&parts[0], &parts[1]),
                ConcatOrder::EmbeddingFirst => (&parts[1], &parts[0]),
            };
            carry = self.norm.backward(d_hn, None, &ds.hn, None)?;
            let d_e = self.norm.backward(d_en, None, &ds.en, None)?;
            deferred.push(DepthDeferredW {
                module: j,
                d_logits,
                hf: ds.hf,
                d_hf,
                final_norm: ds.final_norm,
                block,
                d_u,
                cat: ds.cat,
                ids: ds.ids,
                d_e,
            });
        }
        Ok((carry, MtpDeferredW { depths: deferred }))
    }

    /// Weight half: accumulates (+=) the MTP weights' gradients into `g` and the shared
    /// weights' into `sg`, deepest depth first.
    pub fn backward_weight(
        &self,
        w: MtpDeferredW,
        g: &mut MtpParams,
        sg: MtpSharedGrads<'_>,
    ) -> Result<()> {
        let MtpSharedGrads {
            embed,
            mut head,
            norm,
        } = sg;
        for d in w.depths {
            match head.as_deref_mut() {
                Some(hd) => hd.matmul_acc(&d.d_logits, &d.hf, true, false, 1.0)?,
                None => embed.matmul_acc(&d.d_logits, &d.hf, true, false, 1.0)?,
            }
            norm.add_assign(
                &d.d_hf
                    .rms_norm_backward_weight(&d.final_norm.x, &d.final_norm.rstd)?,
            )?;
            let lg = &mut g.layers[d.module];
            self.block.backward_weight(d.block, &mut lg.block)?;
            lg.input_proj.matmul_acc(&d.d_u, &d.cat, true, false, 1.0)?;
            embedding_backward(embed, &d.ids, &d.d_e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use megamoe_tensor::Device;

    #[test]
    fn step_weights_match_seed() {
        // w_k = β^k/Σβ^j, K=3, β=0.6: [1, .6, .36]/1.96 = [0.5102, 0.3061, 0.1837]
        let w = megamoe_plan::mtp_step_weights(3, 0.6);
        for (got, want) in w.iter().zip([0.5102, 0.3061, 0.1837]) {
            assert!((got - want).abs() < 5e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn roll_left_fills_tail() {
        let x = Tensor::from_vec_i32(vec![1, 2, 3, 4, 5, 6], [2, 3], Device::Cpu).unwrap();
        assert_eq!(
            roll_left(&x, 1, -100).unwrap().to_host_i32().unwrap(),
            vec![2, 3, -100, 5, 6, -100]
        );
        assert_eq!(
            roll_left(&x, 2, 0).unwrap().to_host_i32().unwrap(),
            vec![3, 0, 0, 6, 0, 0]
        );
        assert_eq!(
            roll_left(&x, 5, 0).unwrap().to_host_i32().unwrap(),
            vec![0; 6]
        );
    }
}
