//! The FFN slot of a block: a dense FFN ([`Mlp`]) or an MoE layer ([`MoeLayer`]). One enum
//! per role (layer, params, saved, deferred-W) so the block treats both alike.
//!
//! MoE names follow the MoE crate under `model.layers.{i}.mlp.` (`router.weight`,
//! `experts.gate_up_proj`, `shared_experts.up_proj`, `shared_expert_gate.weight`, ...); the
//! `router.expert_bias` buffer is not a parameter (see [`FfnParams::visit_buffers`]).

use megamoe_moe::{
    MoeDeferredW, MoeLayer, MoeOutput, MoeParams, MoeSaved, MoeStats, RouterLossScale,
};
use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use crate::error::Result;
use crate::init::Init;
use crate::mlp::{Mlp, MlpDeferredW, MlpParams, MlpSaved};

/// Dense or MoE FFN.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense SwiGLU (or relu²/GELU) FFN.
    Dense(Mlp),
    /// Mixture of experts.
    Moe(Box<MoeLayer>),
}

/// The FFN's weights.
#[derive(Debug, Clone)]
pub enum FfnParams {
    /// `mlp.{gate,up,down}_proj.weight`.
    Dense(MlpParams),
    /// `mlp.router.weight`, `mlp.experts.*`, `mlp.shared_experts.*`, ...
    Moe(Box<MoeParams>),
}

impl FfnParams {
    /// Names under `prefix` (`model.layers.{i}.mlp`).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        match self {
            FfnParams::Dense(p) => p.visit(prefix, f),
            FfnParams::Moe(p) => p.visit(&format!("{prefix}."), f),
        }
    }

    /// Mutable twin of [`FfnParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        match self {
            FfnParams::Dense(p) => p.visit_mut(prefix, f),
            FfnParams::Moe(p) => p.visit_mut(&format!("{prefix}."), f),
        }
    }

    /// Non-trained buffers (`{prefix}.router.expert_bias`).
    pub fn visit_buffers(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor)) {
        if let FfnParams::Moe(p) = self {
            p.visit_buffers(&format!("{prefix}."), f);
        }
    }

    /// Mutable twin of [`FfnParams::visit_buffers`] (checkpoint load, expert-bias update).
    pub fn visit_buffers_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor)) {
        if let FfnParams::Moe(p) = self {
            if let Some(b) = &mut p.router.expert_bias {
                f(&format!("{prefix}.router.expert_bias"), b);
            }
        }
    }

    /// A gradient buffer of the same structure (MoE: no expert-bias buffer).
    pub fn zeros_like(&self) -> Result<FfnParams> {
        Ok(match self {
            FfnParams::Dense(p) => {
                let mut z = p.clone();
                crate::init::zeros_like_params(&mut |f| z.visit_mut("", f))?;
                FfnParams::Dense(z)
            }
            FfnParams::Moe(p) => FfnParams::Moe(Box::new(p.zeros_like()?)),
        })
    }
}

/// MoE losses and routing stats of one FFN call (absent for dense FFNs).
#[derive(Debug, Clone)]
pub struct FfnOutput {
    /// Unweighted balancing loss (rank 0).
    pub aux_loss: Tensor,
    /// Unweighted z-loss (rank 0).
    pub z_loss: Tensor,
    /// Routing counts (tokens per expert, dropped, null share via `to_host`).
    pub stats: MoeStats,
}

/// Router-loss gradient scales (loss weight × step scale) for an MoE FFN.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FfnScale {
    /// d(total)/d(aux).
    pub aux: f32,
    /// d(total)/d(z).
    pub z: f32,
}

/// What the FFN's `backward_input` needs.
#[derive(Debug)]
pub enum FfnSaved {
    /// Dense.
    Dense(MlpSaved),
    /// MoE.
    Moe(Box<MoeSaved>),
}

impl FfnSaved {
    /// Visits the saved activations of `targets` for offload (fixed order).
    pub(crate) fn visit_offload(
        &mut self,
        targets: megamoe_plan::OffloadTargets,
        f: &mut dyn FnMut(&mut Tensor) -> megamoe_tensor::Result<()>,
    ) -> megamoe_tensor::Result<()> {
        use megamoe_plan::OffloadTarget as T;
        match self {
            FfnSaved::Dense(m) if targets.contains(T::Mlp) => m.visit_offload(f),
            FfnSaved::Dense(_) => Ok(()),
            FfnSaved::Moe(m) => {
                m.visit_activations(targets.contains(T::ExpertFc1), targets.contains(T::Moe), f)
            }
        }
    }
}

/// What the FFN's `backward_weight` needs.
#[derive(Debug)]
pub enum FfnDeferredW {
    /// Dense.
    Dense(MlpDeferredW),
    /// MoE.
    Moe(Box<MoeDeferredW>),
}

/// An MoE layer's forward result as the FFN's `(y, losses and stats, saved)`.
fn moe_result(out: MoeOutput, s: MoeSaved) -> (Tensor, Option<FfnOutput>, FfnSaved) {
    let losses = FfnOutput {
        aux_loss: out.aux_loss,
        z_loss: out.z_loss,
        stats: out.stats,
    };
    (out.y, Some(losses), FfnSaved::Moe(Box::new(s)))
}

fn mismatch() -> crate::error::Error {
    crate::error::Error::SavedMismatch {
        layer: "ffn",
        rule: "dense/MoE kinds of layer, params and saved state must agree",
    }
}

impl Ffn {
    /// Fresh weights under `prefix`. MoE layers use the MoE crate's init
    /// (`N(0, 1/fan_in)` keyed by name); an expert-parallel layer holds only its local
    /// experts' rows of the global banks (`MoeParams::init_local`).
    pub fn init_params(
        &self,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<FfnParams> {
        self.init_params_tp(init, prefix, std, out_std, None)
    }

    /// [`Ffn::init_params`] of an MoE layer whose shared experts are split over `tp`
    /// (`MoeParams::init_shard`); dense FFN slices come from the block's TP slice.
    pub(crate) fn init_params_tp(
        &self,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
        tp: Option<&megamoe_moe::TensorParallel>,
    ) -> Result<FfnParams> {
        Ok(match self {
            Ffn::Moe(m) if tp.is_some_and(|t| t.size() > 1) => {
                FfnParams::Moe(Box::new(MoeParams::init_shard(
                    m.config(),
                    init.seed,
                    &format!("{prefix}."),
                    m.local_experts(),
                    tp.map(|t| (t.rank(), t.size())),
                )?))
            }
            Ffn::Dense(m) => FfnParams::Dense(MlpParams::init(&m.cfg, init, prefix, std, out_std)?),
            Ffn::Moe(m) if m.local_experts() == (0..m.config().router.num_routed_experts) => {
                FfnParams::Moe(Box::new(MoeParams::init(
                    m.config(),
                    init.seed,
                    &format!("{prefix}."),
                )?))
            }
            Ffn::Moe(m) => FfnParams::Moe(Box::new(MoeParams::init_local(
                m.config(),
                init.seed,
                &format!("{prefix}."),
                m.local_experts(),
            )?)),
        })
    }

    /// `x [N, H]` → `(y [N, H], MoE outputs, saved)`.
    pub fn forward(
        &self,
        p: &FfnParams,
        x: &Tensor,
    ) -> Result<(Tensor, Option<FfnOutput>, FfnSaved)> {
        match (self, p) {
            (Ffn::Dense(m), FfnParams::Dense(p)) => {
                let (y, s) = m.forward(p, x)?;
                Ok((y, None, FfnSaved::Dense(s)))
            }
            (Ffn::Moe(m), FfnParams::Moe(p)) => {
                let (out, s) = m.forward(p, x)?;
                Ok(moe_result(out, s))
            }
            _ => Err(mismatch()),
        }
    }

    /// [`Ffn::forward`] with the block's residual stream added: `y = residual + ffn(x)`,
    /// folded into the last op of the branch (the dense down projection's GEMM, the MoE
    /// layer's output sum: [`MoeLayer::forward_residual`]). On the CPU the bits of `residual.add(&forward(..).0)`.
    pub fn forward_residual(
        &self,
        p: &FfnParams,
        x: &Tensor,
        residual: &Tensor,
    ) -> Result<(Tensor, Option<FfnOutput>, FfnSaved)> {
        match (self, p) {
            (Ffn::Dense(m), FfnParams::Dense(p)) => {
                let (y, s) = m.forward_residual(p, x, residual)?;
                Ok((y, None, FfnSaved::Dense(s)))
            }
            (Ffn::Moe(m), FfnParams::Moe(p)) => {
                let (out, s) = m.forward_residual(p, x, residual)?;
                Ok(moe_result(out, s))
            }
            _ => Err(mismatch()),
        }
    }

    /// `d_y` → `d_x` (fresh); MoE router-loss gradients enter here with `scale`.
    pub fn backward_input(
        &self,
        p: &FfnParams,
        d_y: &Tensor,
        s: FfnSaved,
        scale: &FfnScale,
    ) -> Result<(Tensor, FfnDeferredW)> {
        match (self, p, s) {
            (Ffn::Dense(m), FfnParams::Dense(p), FfnSaved::Dense(s)) => {
                let (d_x, w) = m.backward_input(p, d_y, s)?;
                Ok((d_x, FfnDeferredW::Dense(w)))
            }
            (Ffn::Moe(m), FfnParams::Moe(p), FfnSaved::Moe(s)) => {
                let rs = RouterLossScale {
                    aux: scale.aux,
                    z: scale.z,
                };
                let (d_x, w) = m.backward_input(p, d_y, *s, rs)?;
                Ok((d_x, FfnDeferredW::Moe(Box::new(w))))
            }
            _ => Err(mismatch()),
        }
    }

    /// Accumulates (+=) weight gradients.
    pub fn backward_weight(&self, w: FfnDeferredW, g: &mut FfnParams) -> Result<()> {
        match (self, w, g) {
            (Ffn::Dense(m), FfnDeferredW::Dense(w), FfnParams::Dense(g)) => m.backward_weight(w, g),
            (Ffn::Moe(m), FfnDeferredW::Moe(w), FfnParams::Moe(g)) => Ok(m.backward_weight(*w, g)?),
            _ => Err(mismatch()),
        }
    }
}
