//! The FFN slot of a block: a dense FFN ([`Mlp`]) or an MoE layer. One enum per role
//! (config, params, saved, deferred-W) so the block treats both alike.

use megamoe_tensor::{ParamRole, Tensor};

use crate::error::Result;
use crate::init::Init;
use crate::mlp::{Mlp, MlpDeferredW, MlpParams, MlpSaved};

/// Dense or MoE FFN.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense SwiGLU (or relu²/GELU) FFN.
    Dense(Mlp),
}

/// The FFN's weights.
#[derive(Debug, Clone)]
pub enum FfnParams {
    /// `mlp.{gate,up,down}_proj.weight`.
    Dense(MlpParams),
}

impl FfnParams {
    /// Names under `prefix` (`model.layers.{i}.mlp`).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        match self {
            FfnParams::Dense(p) => p.visit(prefix, f),
        }
    }

    /// Mutable twin of [`FfnParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        match self {
            FfnParams::Dense(p) => p.visit_mut(prefix, f),
        }
    }
}

/// MoE losses and routing stats of one FFN call (absent for dense FFNs).
#[derive(Debug, Clone)]
pub struct FfnOutput {
    /// Unweighted balancing loss (rank 0).
    pub aux_loss: Tensor,
    /// Unweighted z-loss (rank 0).
    pub z_loss: Tensor,
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
}

/// What the FFN's `backward_weight` needs.
#[derive(Debug)]
pub enum FfnDeferredW {
    /// Dense.
    Dense(MlpDeferredW),
}

impl Ffn {
    /// Fresh weights under `prefix`.
    pub fn init_params(
        &self,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<FfnParams> {
        Ok(match self {
            Ffn::Dense(m) => FfnParams::Dense(MlpParams::init(&m.cfg, init, prefix, std, out_std)?),
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
        }
    }

    /// `d_y` → `d_x` (fresh).
    pub fn backward_input(
        &self,
        p: &FfnParams,
        d_y: &Tensor,
        s: FfnSaved,
        scale: &FfnScale,
    ) -> Result<(Tensor, FfnDeferredW)> {
        let _ = scale;
        match (self, p, s) {
            (Ffn::Dense(m), FfnParams::Dense(p), FfnSaved::Dense(s)) => {
                let (d_x, w) = m.backward_input(p, d_y, s)?;
                Ok((d_x, FfnDeferredW::Dense(w)))
            }
        }
    }

    /// Accumulates (+=) weight gradients.
    pub fn backward_weight(&self, w: FfnDeferredW, g: &mut FfnParams) -> Result<()> {
        match (self, w, g) {
            (Ffn::Dense(m), FfnDeferredW::Dense(w), FfnParams::Dense(g)) => m.backward_weight(w, g),
        }
    }
}
