//! One pre-norm decoder block: attention then FFN (dense or MoE), residual sums explicit.
//!
//! ```text
//! plain:     x1 = x + A(N1(x));            y = x1 + F(N2(x1))   (each add folded into the
//!            op writing its branch's output: A's o_proj GEMM, F's down GEMM / MoE sum)
//! GateSkip:  A and F outputs pass through a `skip_gate` (gate_skip.rs): out = keep ⊙ g ⊙ f,
//!            and the residual add touches only kept rows (skipped rows copied bit-for-bit)
//! FlexiDepth (adaptive layers, flexi_depth.rs), with router score g [N] and m = [g > τ]:
//!            x' = x + A(N1(x));  y = x + m⊙A(N1(x)) + (m g)⊙F(N2(x')) + ((1−m)(1−g))⊙Ad(N2(x))
//! ```
//! Accumulation: `backward_input` writes `d_x` fresh; `backward_weight` accumulates (+=) into
//! a [`BlockParams`] of gradients. Norm weight gradients are computed in I and added in W.

use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use crate::attention::{Attention, AttentionDeferredW, AttentionParams, AttentionSaved};
use crate::error::Result;
use crate::ffn::{Ffn, FfnDeferredW, FfnOutput, FfnParams, FfnSaved, FfnScale};
use crate::flexi_depth::{
    DepthRouter, DepthRouterDeferredW, DepthRouterSaved, FlexiDepthConfig, FlexiDepthParams,
};
use crate::gate_skip::{
    residual_add, GateSkipConfig, SkipCx, SkipGate, SkipGateDeferredW, SkipGateParams,
    SkipGateSaved, SkipMask,
};
use crate::init::Init;
use crate::mlp::{Mlp, MlpDeferredW, MlpSaved};
use crate::norm::{RmsNorm, RmsNormSaved};
use crate::tp::BlockTp;

/// The gates of one block's two branches.
#[derive(Debug, Clone)]
pub struct BlockSkipGates {
    /// Gate of the attention branch.
    pub attn: SkipGateParams,
    /// Gate of the MLP/MoE branch.
    pub mlp: SkipGateParams,
}

/// Every weight of one block (same type for gradients and optimizer moments).
#[derive(Debug, Clone)]
pub struct BlockParams {
    /// N1 weight `[H]`.
    pub input_layernorm: Tensor,
    /// Attention projections.
    pub self_attn: AttentionParams,
    /// N2 weight `[H]`.
    pub post_attention_layernorm: Tensor,
    /// Dense or MoE FFN.
    pub mlp: FfnParams,
    /// GateSkip gates (`skip_gate.attn`, `skip_gate.mlp`).
    pub skip_gate: Option<BlockSkipGates>,
    /// FlexiDepth router and adapter.
    pub flexi_depth: Option<FlexiDepthParams>,
}

impl BlockParams {
    /// HF-style names under `prefix` (e.g. `model.layers.3`).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        f(
            &format!("{prefix}.input_layernorm.weight"),
            &self.input_layernorm,
            ParamRole::Norm,
        );
        self.self_attn.visit(&format!("{prefix}.self_attn"), f);
        f(
            &format!("{prefix}.post_attention_layernorm.weight"),
            &self.post_attention_layernorm,
            ParamRole::Norm,
        );
        self.mlp.visit(&format!("{prefix}.mlp"), f);
        if let Some(g) = &self.skip_gate {
            g.attn.visit(&format!("{prefix}.skip_gate.attn"), f);
            g.mlp.visit(&format!("{prefix}.skip_gate.mlp"), f);
        }
        if let Some(fd) = &self.flexi_depth {
            fd.visit(prefix, f);
        }
    }

    /// Mutable twin of [`BlockParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        f(
            &format!("{prefix}.input_layernorm.weight"),
            &mut self.input_layernorm,
            ParamRole::Norm,
        );
        self.self_attn.visit_mut(&format!("{prefix}.self_attn"), f);
        f(
            &format!("{prefix}.post_attention_layernorm.weight"),
            &mut self.post_attention_layernorm,
            ParamRole::Norm,
        );
        self.mlp.visit_mut(&format!("{prefix}.mlp"), f);
        if let Some(g) = &mut self.skip_gate {
            g.attn.visit_mut(&format!("{prefix}.skip_gate.attn"), f);
            g.mlp.visit_mut(&format!("{prefix}.skip_gate.mlp"), f);
        }
        if let Some(fd) = &mut self.flexi_depth {
            fd.visit_mut(prefix, f);
        }
    }
}

/// Token layout and per-step settings of one block call.
#[derive(Debug, Clone, Copy)]
pub struct BlockCx<'a> {
    /// B.
    pub b: usize,
    /// T.
    pub t: usize,
    /// GateSkip skip share for this layer and step (0 for layer 0 and when off).
    pub skip_budget: f64,
    /// `[N]` padding tokens that GateSkip never skips.
    pub never_skip: Option<&'a Tensor>,
}

/// Losses and statistics one block call produces (tensors; read on the host once per step).
#[derive(Debug, Clone, Default)]
pub struct BlockOutputs {
    /// Σ of the two gates' unweighted penalties (GateSkip).
    pub gate_penalty: Option<Tensor>,
    /// Mean gate value of the attention and MLP gates (rank 0 each).
    pub mean_gate: Option<(Tensor, Tensor)>,
    /// Kept token share of the attention and MLP branches (host values, known from the
    /// budget without a sync).
    pub kept_fraction: Option<(f64, f64)>,
    /// FlexiDepth router score `g [N]`.
    pub depth_score: Option<Tensor>,
    /// FlexiDepth `skip_mask` `m [N]` (1 = full path).
    pub full_path: Option<Tensor>,
    /// MoE aux loss, z-loss and routing stats.
    pub moe: Option<FfnOutput>,
}

/// Gradient scales for one block's backward.
#[derive(Debug, Clone, Default)]
pub struct BlockGradCx {
    /// d(total)/d(this block's gate penalty) (λ_s / n_gated_modules × step scale).
    pub gate_penalty: f32,
    /// d(total)/d(g) of the FlexiDepth skip loss `[N]`.
    pub d_depth_score: Option<Tensor>,
    /// MoE router-loss scales.
    pub ffn: FfnScale,
}

/// One branch after its optional skip gate.
struct Gated {
    out: Tensor,
    saved: Option<SkipGateSaved>,
    mask: Option<SkipMask>,
    /// (penalty, mean gate, kept share).
    stats: Option<(Tensor, Tensor, f64)>,
}

#[derive(Debug)]
struct FlexiSaved {
    router: DepthRouterSaved,
    /// `m [N]`, `g [N]`.
    m: Tensor,
    g: Tensor,
    /// Gated branch outputs `[N, H]`.
    a_out: Tensor,
    f_out: Tensor,
    ad: Tensor,
    n2s: RmsNormSaved,
    adapter: MlpSaved,
}

/// What `backward_input` needs (moved by value).
#[derive(Debug)]
pub struct BlockSaved {
    /// Sequences of the micro-batch (the sequence-parallel collectives need it).
    b: usize,
    n1: RmsNormSaved,
    attn: AttentionSaved,
    attn_gate: Option<SkipGateSaved>,
    n2: RmsNormSaved,
    ffn: FfnSaved,
    mlp_gate: Option<SkipGateSaved>,
    flexi: Option<FlexiSaved>,
}

impl BlockSaved {
    /// Bytes of the saved residual-stream tensors: both norms' inputs and `1/rms` (under
    /// sequence parallelism this rank's shard of them).
    pub(crate) fn residual_stream_bytes(&self) -> u64 {
        [&self.n1.x, &self.n1.rstd, &self.n2.x, &self.n2.rstd]
            .iter()
            .map(|t| tensor_bytes(t))
            .sum()
    }

    /// Visits the saved activations of `targets` for offload, always in the same order
    /// (attention, then the FFN).
    pub(crate) fn visit_offload(
        &mut self,
        targets: megamoe_plan::OffloadTargets,
        f: &mut dyn FnMut(&mut Tensor) -> megamoe_tensor::Result<()>,
    ) -> megamoe_tensor::Result<()> {
        self.attn.visit_offload(targets, f)?;
        self.ffn.visit_offload(targets, f)
    }
}

/// Bytes of `t`'s elements.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.dtype().size_in_bytes()) as u64
}

/// The residual stream's gradient at a block boundary: `sum` (f32 on a GPU in bf16 mode)
/// and the same values in the activation dtype (`sum` itself on the CPU and in f32 mode).
#[derive(Debug, Clone)]
pub struct ResidualGrad {
    /// The gradient, as accumulated.
    pub sum: Tensor,
    /// Its copy for GEMM readers.
    pub act: Tensor,
}

/// What `backward_weight` needs (moved by value).
#[derive(Debug)]
pub struct BlockDeferredW {
    d_n1: Tensor,
    d_n2: Tensor,
    attn: AttentionDeferredW,
    ffn: FfnDeferredW,
    attn_gate: Option<SkipGateDeferredW>,
    mlp_gate: Option<SkipGateDeferredW>,
    router: Option<DepthRouterDeferredW>,
    adapter: Option<MlpDeferredW>,
}

/// A decoder block (stateless: parameters are passed in).
#[derive(Debug, Clone)]
pub struct Block {
    /// Layer index (0-based).
    pub layer: usize,
    /// Norm ε.
    pub norm: RmsNorm,
    /// Attention.
    pub attn: Attention,
    /// FFN.
    pub ffn: Ffn,
    /// GateSkip gate settings.
    pub gate_skip: Option<GateSkipConfig>,
    /// FlexiDepth settings (adaptive layers only).
    pub flexi_depth: Option<FlexiDepthConfig>,
    /// This rank's tensor-parallel slice (`None`: the whole block; see [`crate::tp`]).
    pub tp: Option<BlockTp>,
}

impl Block {
    /// `g` / `f'` of a tensor-parallel branch: the partial output (or input gradient)
    /// summed over the TP group (under sp: this rank's sequence shard of the sum);
    /// unchanged without TP.
    fn tp_reduce(&self, partial: Tensor, b: usize) -> Result<Tensor> {
        match &self.tp {
            Some(tp) => tp.reduce(&partial, b),
            None => Ok(partial),
        }
    }

    /// A dense FFN branch is split by TP (an MoE branch reduces inside its shared experts
    /// and is replicated: under sp this rank keeps its rows).
    fn tp_reduce_ffn(&self, partial: Tensor, b: usize) -> Result<Tensor> {
        match (&self.ffn, &self.tp) {
            (Ffn::Dense(_), _) => self.tp_reduce(partial, b),
            (Ffn::Moe(_), Some(tp)) => tp.shard(&partial, b),
            (Ffn::Moe(_), None) => Ok(partial),
        }
    }

    /// A branch input or output gradient over the whole sequence (all-gathered under sp).
    fn tp_gather(&self, x: Tensor, b: usize) -> Result<Tensor> {
        match &self.tp {
            Some(tp) => tp.gather(&x, b),
            None => Ok(x),
        }
    }

    /// A norm weight's gradient (summed over the TP group under sp).
    fn tp_norm_grad(&self, g: Tensor) -> Result<Tensor> {
        match &self.tp {
            Some(tp) => tp.sum_shard_grad(g),
            None => Ok(g),
        }
    }

    /// Fresh parameters: matrices ~ N(0, std), residual outputs ~ N(0, out_std), norms 1.
    pub fn init_params(
        &self,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<BlockParams> {
        let h = self.attn.cfg.d_model;
        let skip_gate = match &self.gate_skip {
            Some(c) => Some(BlockSkipGates {
                attn: SkipGateParams::init(c, init, &format!("{prefix}.skip_gate.attn"))?,
                mlp: SkipGateParams::init(c, init, &format!("{prefix}.skip_gate.mlp"))?,
            }),
            None => None,
        };
        let flexi_depth = match &self.flexi_depth {
            Some(c) => Some(FlexiDepthParams::init(c, init, prefix, std)?),
            None => None,
        };
        let (attn_prefix, mlp_prefix) = (format!("{prefix}.self_attn"), format!("{prefix}.mlp"));
        let self_attn = match &self.tp {
            Some(tp) => tp.init_attention(init, &attn_prefix, std, out_std)?,
            None => AttentionParams::init(&self.attn.cfg, init, &attn_prefix, std, out_std)?,
        };
        let mlp = match self.tp.as_ref() {
            Some(tp) => match tp.init_mlp(init, &mlp_prefix, std, out_std)? {
                Some(p) => FfnParams::Dense(p),
                None => {
                    self.ffn
                        .init_params_tp(init, &mlp_prefix, std, out_std, Some(&tp.group))?
                }
            },
            None => self.ffn.init_params(init, &mlp_prefix, std, out_std)?,
        };
        Ok(BlockParams {
            input_layernorm: init.full(&[h], 1.0)?,
            self_attn,
            post_attention_layernorm: init.full(&[h], 1.0)?,
            mlp,
            skip_gate,
            flexi_depth,
        })
    }

    fn gated(
        &self,
        gate: Option<&SkipGateParams>,
        h: &Tensor,
        f: Tensor,
        cx: &BlockCx<'_>,
    ) -> Result<Gated> {
        match (self.gate_skip, gate) {
            (Some(cfg), Some(p)) => {
                let sg = SkipGate { cfg };
                let scx = SkipCx {
                    b: cx.b,
                    t: cx.t,
                    budget: cx.skip_budget,
                    never_skip: cx.never_skip,
                };
                let (br, saved) = sg.forward(p, h, f, &scx)?;
                let kept = match &br.mask {
                    Some(m) => (cx.t - m.skipped_per_seq) as f64 / cx.t as f64,
                    None => 1.0,
                };
                Ok(Gated {
                    out: br.out,
                    saved: Some(saved),
                    mask: br.mask,
                    stats: Some((br.penalty, br.mean_gate, kept)),
                })
            }
            _ => Ok(Gated {
                out: f,
                saved: None,
                mask: None,
                stats: None,
            }),
        }
    }

    /// `x [N, H]` → `y [N, H]`, its losses/stats and what backward needs.
    pub fn forward(
        &self,
        p: &BlockParams,
        x: &Tensor,
        cx: &BlockCx<'_>,
    ) -> Result<(Tensor, BlockOutputs, BlockSaved)> {
        let mut out = BlockOutputs::default();
        let gates = p.skip_gate.as_ref();
        // Without TP, GateSkip and FlexiDepth each residual add folds into the op that
        // writes its branch's output (the attention's o_proj GEMM, the FFN's last op).
        let gated = self.gate_skip.is_some() && gates.is_some();
        let flexi = self.flexi_depth.is_some() && p.flexi_depth.is_some();
        if self.tp.is_none() && !gated && !flexi {
            return self.forward_folded(p, x, cx);
        }
        // Attention branch.
        let (h1, n1) = self.norm.forward(x, Some(&p.input_layernorm))?;
        let (a, attn) = {
            let h1 = self.tp_gather(h1.clone(), cx.b)?;
            self.attn.forward(&p.self_attn, &h1, cx.b, cx.t)?
        };
        let a = self.tp_reduce(a, cx.b)?;
        let Gated {
            out: a_out,
            saved: attn_gate,
            mask: mask_a,
            stats: ga,
        } = self.gated(gates.map(|g| &g.attn), &h1, a, cx)?;
        let x1 = residual_add(x, &a_out, mask_a.as_ref())?;
        // FFN branch.
        let (h2, n2) = self.norm.forward(&x1, Some(&p.post_attention_layernorm))?;
        let (f, ffn_out, ffn) = {
            let h2 = self.tp_gather(h2.clone(), cx.b)?;
            self.ffn.forward(&p.mlp, &h2)?
        };
        let f = self.tp_reduce_ffn(f, cx.b)?;
        out.moe = ffn_out;
        let Gated {
            out: f_out,
            saved: mlp_gate,
            mask: mask_f,
            stats: gm,
        } = self.gated(gates.map(|g| &g.mlp), &h2, f, cx)?;
        if let (Some((pa, ma, ka)), Some((pm, mm, km))) = (ga, gm) {
            out.gate_penalty = Some(pa.add(&pm)?);
            out.mean_gate = Some((ma, mm));
            out.kept_fraction = Some((ka, km));
        }
        let (y, flexi) = match (&self.flexi_depth, &p.flexi_depth) {
            (Some(fc), Some(fp)) => {
                let router = DepthRouter { cfg: *fc };
                let (g, rs) = router.forward(fp, x)?;
                let m = g.gt_scalar(fc.threshold)?;
                let (h2s, n2s) = self.norm.forward(x, Some(&p.post_attention_layernorm))?;
                let adapter = Mlp { cfg: fc.adapter() };
                let (ad, ads) = adapter.forward(&fp.adapter, &h2s)?;
                // c_f = m ⊙ g; c_ad = (1−m) ⊙ (1−g)
                let c_f = m.mul(&g)?;
                let c_ad = m.affine(-1.0, 1.0)?.mul(&g.affine(-1.0, 1.0)?)?;
                let mut y = x.add(&a_out.mul_col(&m)?)?;
                y.add_assign(&f_out.mul_col(&c_f)?)?;
                y.add_assign(&ad.mul_col(&c_ad)?)?;
                out.depth_score = Some(g.clone());
                out.full_path = Some(m.clone());
                (
                    y,
                    Some(FlexiSaved {
                        router: rs,
                        m,
                        g,
                        a_out,
                        f_out,
                        ad,
                        n2s,
                        adapter: ads,
                    }),
                )
            }
            _ => (residual_add(&x1, &f_out, mask_f.as_ref())?, None),
        };
        Ok((
            y,
            out,
            BlockSaved {
                b: cx.b,
                n1,
                attn,
                attn_gate,
                n2,
                ffn,
                mlp_gate,
                flexi,
            },
        ))
    }

    /// [`Block::forward`] of a plain block (no TP, GateSkip or FlexiDepth): the residual
    /// adds folded into their producers (`x1 = x + o W_oᵀ` one GEMM on a GPU, `y = x1 +
    /// ffn(N2(x1))` the FFN's last op). On the CPU the bits of the unfused path.
    fn forward_folded(
        &self,
        p: &BlockParams,
        x: &Tensor,
        cx: &BlockCx<'_>,
    ) -> Result<(Tensor, BlockOutputs, BlockSaved)> {
        let (h1, n1) = self.norm.forward(x, Some(&p.input_layernorm))?;
        let (x1, attn) = self
            .attn
            .forward_residual(&p.self_attn, &h1, (cx.b, cx.t), x)?;
        let (h2, n2) = self.norm.forward(&x1, Some(&p.post_attention_layernorm))?;
        let (y, moe, ffn) = self.ffn.forward_residual(&p.mlp, &h2, &x1)?;
        let out = BlockOutputs {
            moe,
            ..BlockOutputs::default()
        };
        let saved = BlockSaved {
            b: cx.b,
            n1,
            attn,
            attn_gate: None,
            n2,
            ffn,
            mlp_gate: None,
            flexi: None,
        };
        Ok((y, out, saved))
    }

    /// `d_y [N, H]` → `d_x [N, H]` (fresh).
    pub fn backward_input(
        &self,
        p: &BlockParams,
        d_y: &Tensor,
        s: BlockSaved,
        gcx: &BlockGradCx,
    ) -> Result<(Tensor, BlockDeferredW)> {
        let d_y = ResidualGrad {
            sum: d_y.clone(),
            act: d_y.clone(),
        };
        let (d_x, w) = self.backward_input_residual(p, &d_y, s, gcx)?;
        Ok((d_x.sum, w))
    }

    /// [`Block::backward_input`] between blocks: `d_y` and the returned `d_x` carry the
    /// residual gradient with its activation-dtype copy (written by the same fused pass
    /// as the sum), which the FFN branch's GEMMs read.
    pub fn backward_input_residual(
        &self,
        p: &BlockParams,
        d_y: &ResidualGrad,
        s: BlockSaved,
        gcx: &BlockGradCx,
    ) -> Result<(ResidualGrad, BlockDeferredW)> {
        let (d_y, d_y_act) = (&d_y.sum, &d_y.act);
        // N2's weight gradient from FlexiDepth's adapter path (added to the main one below).
        let mut d_n2_flexi = None;
        // Gradients reaching the FFN branch output, the attention branch output (FlexiDepth
        // only: without it that is the residual gradient), and x.
        let (d_f_out, d_a_direct, d_x, flexi_parts) = match s.flexi {
            Some(fs) => {
                let fc = self.flexi_depth.expect("flexi saved only when configured");
                let fp = p
                    .flexi_depth
                    .as_ref()
                    .expect("flexi saved only with params");
                let c_f = fs.m.mul(&fs.g)?;
                let one_minus_m = fs.m.affine(-1.0, 1.0)?;
                let c_ad = one_minus_m.mul(&fs.g.affine(-1.0, 1.0)?)?;
                // dL/dg = m ⊙ ⟨d_y, f_out⟩ − (1−m) ⊙ ⟨d_y, ad⟩ (+ skip loss)
                let mut d_g = fs.m.mul(&d_y.mul(&fs.f_out)?.sum_last_dim()?)?;
                d_g = d_g.sub(&one_minus_m.mul(&d_y.mul(&fs.ad)?.sum_last_dim()?)?)?;
                if let Some(ds) = &gcx.d_depth_score {
                    d_g.add_assign(ds)?;
                }
                let router = DepthRouter { cfg: fc };
                let (d_x_router, rw) = router.backward_input(fp, &d_g, fs.router)?;
                let adapter = Mlp { cfg: fc.adapter() };
                let (d_h2s, aw) =
                    adapter.backward_input(&fp.adapter, &d_y.mul_col(&c_ad)?, fs.adapter)?;
                let n2s = self.norm.backward_add(
                    &d_h2s,
                    Some(&p.post_attention_layernorm),
                    &fs.n2s,
                    &d_y.add(&d_x_router)?,
                    false,
                )?;
                d_n2_flexi = Some(n2s.d_w);
                let _ = &fs.a_out;
                (
                    d_y.mul_col(&c_f)?,
                    Some(d_y.mul_col(&fs.m)?),
                    n2s.sum,
                    Some((rw, aw)),
                )
            }
            None => (d_y_act.clone(), None, d_y.clone(), None),
        };
        let gates = (self.gate_skip, p.skip_gate.as_ref());
        // FFN branch.
        let (d_f, mlp_gate) = match (s.mlp_gate, gates) {
            (Some(gs), (Some(cfg), Some(_))) => {
                let (d_f, w) = SkipGate { cfg }.backward_input(&d_f_out, gs, gcx.gate_penalty)?;
                (d_f, Some(w))
            }
            _ => (d_f_out, None),
        };
        let b = s.b;
        let d_f = self.tp_gather(d_f, b)?;
        let (d_h2, ffn) = self.ffn.backward_input(&p.mlp, &d_f, s.ffn, &gcx.ffn)?;
        let d_h2 = self.tp_reduce_ffn(d_h2, b)?;
        // x1 = x + a_out: the residual stream carries d_x1 to both. Without FlexiDepth the
        // attention output's gradient IS the new residual gradient d_x + d_x1 (one fused
        // pass writes it, and its copy in the activation dtype for the attention GEMMs).
        let w2 = Some(&p.post_attention_layernorm);
        let (d_a_out, d_x, d_n2) = match d_a_direct {
            None => {
                let n2 = self.norm.backward_add(&d_h2, w2, &s.n2, &d_x, true)?;
                (n2.act, n2.sum, n2.d_w)
            }
            Some(d_a_direct) => {
                let d_x1 = self.norm.backward(&d_h2, w2, &s.n2, None)?;
                let d_n2 = d_h2.rms_norm_backward_weight(&s.n2.x, &s.n2.rstd)?;
                let mut d_x = d_x;
                d_x.add_assign(&d_x1)?;
                (d_a_direct.add(&d_x1)?, d_x, d_n2)
            }
        };
        let d_n2 = match d_n2_flexi {
            Some(mut g) => {
                g.add_assign(&d_n2)?;
                g
            }
            None => d_n2,
        };
        let (d_a, attn_gate) = match (s.attn_gate, gates) {
            (Some(gs), (Some(cfg), Some(_))) => {
                let (d_a, w) = SkipGate { cfg }.backward_input(&d_a_out, gs, gcx.gate_penalty)?;
                (d_a, Some(w))
            }
            _ => (d_a_out, None),
        };
        let d_a = self.tp_gather(d_a, b)?;
        let (d_h1, attn) = self.attn.backward_input(&p.self_attn, &d_a, s.attn)?;
        let d_h1 = self.tp_reduce(d_h1, b)?;
        let n1 = self
            .norm
            .backward_add(&d_h1, Some(&p.input_layernorm), &s.n1, &d_x, true)?;
        let (d_x, d_n1) = (
            ResidualGrad {
                sum: n1.sum,
                act: n1.act,
            },
            n1.d_w,
        );
        let (router, adapter) = match flexi_parts {
            Some((r, a)) => (Some(r), Some(a)),
            None => (None, None),
        };
        Ok((
            d_x,
            BlockDeferredW {
                d_n1: self.tp_norm_grad(d_n1)?,
                d_n2: self.tp_norm_grad(d_n2)?,
                attn,
                ffn,
                attn_gate,
                mlp_gate,
                router,
                adapter,
            },
        ))
    }

    /// Accumulates (+=) every weight gradient into `g`.
    pub fn backward_weight(&self, w: BlockDeferredW, g: &mut BlockParams) -> Result<()> {
        g.input_layernorm.add_assign(&w.d_n1)?;
        g.post_attention_layernorm.add_assign(&w.d_n2)?;
        self.attn.backward_weight(w.attn, &mut g.self_attn)?;
        self.ffn.backward_weight(w.ffn, &mut g.mlp)?;
        if let (Some(cfg), Some(gg)) = (self.gate_skip, g.skip_gate.as_mut()) {
            let sg = SkipGate { cfg };
            if let Some(aw) = w.attn_gate {
                sg.backward_weight(aw, &mut gg.attn)?;
            }
            if let Some(mw) = w.mlp_gate {
                sg.backward_weight(mw, &mut gg.mlp)?;
            }
        }
        if let (Some(fc), Some(fg)) = (self.flexi_depth, g.flexi_depth.as_mut()) {
            if let Some(rw) = w.router {
                DepthRouter { cfg: fc }.backward_weight(rw, fg)?;
            }
            if let Some(aw) = w.adapter {
                Mlp { cfg: fc.adapter() }.backward_weight(aw, &mut fg.adapter)?;
            }
        }
        Ok(())
    }

    /// I then W.
    pub fn backward(
        &self,
        p: &BlockParams,
        d_y: &Tensor,
        s: BlockSaved,
        gcx: &BlockGradCx,
        g: &mut BlockParams,
    ) -> Result<Tensor> {
        let (d_x, w) = self.backward_input(p, d_y, s, gcx)?;
        self.backward_weight(w, g)?;
        Ok(d_x)
    }
}
