//! Dense FFN, PyTorch layout `[out, in]`:
//! SwiGLU `y = (silu(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ` (Shazeer 2020), or the two-matrix
//! `y = act(x W_upᵀ) W_downᵀ` with act = relu² or GELU (erf).
//! `x [N, H]`, `W_gate, W_up [F, H]`, `W_down [H, F]`.
//!
//! Forward saves `x`, the pre-activations and the activation `a [N, F]`; `backward_input`
//! returns `d_x` (fresh) and a [`MlpDeferredW`]; `backward_weight` accumulates (+=).

use megamoe_optim::ParamRole;
use megamoe_plan::Activation;
use megamoe_tensor::Tensor;

use crate::error::{Error, Result};
use crate::init::Init;

/// Dense FFN shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpConfig {
    /// H.
    pub d_model: usize,
    /// F.
    pub hidden: usize,
    /// Activation (SwiGLU uses three matrices).
    pub activation: Activation,
}

/// Weights of a dense FFN.
#[derive(Debug, Clone)]
pub struct MlpParams {
    /// `[F, H]`; `None` unless SwiGLU.
    pub gate_proj: Option<Tensor>,
    /// `[F, H]`.
    pub up_proj: Tensor,
    /// `[H, F]`.
    pub down_proj: Tensor,
}

impl MlpParams {
    /// Random init: `gate/up ~ N(0, std)`, `down ~ N(0, out_std)` keyed by name.
    pub fn init(
        cfg: &MlpConfig,
        init: &Init,
        prefix: &str,
        std: f32,
        out_std: f32,
    ) -> Result<Self> {
        let (f, h) = (cfg.hidden, cfg.d_model);
        let gate_proj = match cfg.activation {
            Activation::SwiGlu => {
                Some(init.randn(&format!("{prefix}.gate_proj.weight"), &[f, h], std)?)
            }
            _ => None,
        };
        Ok(MlpParams {
            gate_proj,
            up_proj: init.randn(&format!("{prefix}.up_proj.weight"), &[f, h], std)?,
            down_proj: init.randn(&format!("{prefix}.down_proj.weight"), &[h, f], out_std)?,
        })
    }

    /// Enumerates `{prefix}.gate_proj.weight`, `.up_proj.weight`, `.down_proj.weight`.
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        if let Some(g) = &self.gate_proj {
            f(&format!("{prefix}.gate_proj.weight"), g, ParamRole::Matrix);
        }
        f(
            &format!("{prefix}.up_proj.weight"),
            &self.up_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.down_proj.weight"),
            &self.down_proj,
            ParamRole::Matrix,
        );
    }

    /// Mutable twin of [`MlpParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        if let Some(g) = &mut self.gate_proj {
            f(&format!("{prefix}.gate_proj.weight"), g, ParamRole::Matrix);
        }
        f(
            &format!("{prefix}.up_proj.weight"),
            &mut self.up_proj,
            ParamRole::Matrix,
        );
        f(
            &format!("{prefix}.down_proj.weight"),
            &mut self.down_proj,
            ParamRole::Matrix,
        );
    }
}

/// What `backward_input` needs.
#[derive(Debug)]
pub struct MlpSaved {
    /// Input `[N, H]`.
    x: Tensor,
    /// `x W_gateᵀ` `[N, F]` (SwiGLU only).
    gate: Option<Tensor>,
    /// `x W_upᵀ` `[N, F]`.
    up: Tensor,
    /// Activation fed to `W_down` `[N, F]`.
    act: Tensor,
}

impl MlpSaved {
    /// Visits the input, pre-activations and activation for offload (fixed order).
    pub(crate) fn visit_offload(
        &mut self,
        f: &mut dyn FnMut(&mut Tensor) -> megamoe_tensor::Result<()>,
    ) -> megamoe_tensor::Result<()> {
        f(&mut self.x)?;
        if let Some(g) = &mut self.gate {
            f(g)?;
        }
        f(&mut self.up)?;
        f(&mut self.act)
    }
}

/// What `backward_weight` needs.
#[derive(Debug)]
pub struct MlpDeferredW {
    x: Tensor,
    act: Tensor,
    d_y: Tensor,
    d_gate: Option<Tensor>,
    d_up: Tensor,
}

/// A dense FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mlp {
    /// Shape and activation.
    pub cfg: MlpConfig,
}

impl Mlp {
    /// `x [N, H]` → `y [N, H]`.
    pub fn forward(&self, p: &MlpParams, x: &Tensor) -> Result<(Tensor, MlpSaved)> {
        self.forward_impl(p, x, None)
    }

    /// [`Mlp::forward`] with a residual stream added by the down projection:
    /// `y = residual + act W_downᵀ` ([`Tensor::matmul_add`]: one GEMM on a GPU in bf16; on
    /// the CPU the bits of `residual.add(&forward(..).0)`). Same saved state.
    pub fn forward_residual(
        &self,
        p: &MlpParams,
        x: &Tensor,
        residual: &Tensor,
    ) -> Result<(Tensor, MlpSaved)> {
        self.forward_impl(p, x, Some(residual))
    }

    fn forward_impl(
        &self,
        p: &MlpParams,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, MlpSaved)> {
        let up = x.matmul(&p.up_proj, false, true)?;
        let (gate, act) = match self.cfg.activation {
            Activation::SwiGlu => {
                let w = p.gate_proj.as_ref().ok_or(Error::SavedMismatch {
                    layer: "mlp",
                    rule: "SwiGLU needs gate_proj",
                })?;
                let gate = x.matmul(w, false, true)?;
                let act = gate.swiglu(&up)?;
                (Some(gate), act)
            }
            Activation::Relu2 => (None, up.relu2()?),
            Activation::Gelu => (None, up.gelu()?),
        };
        let y = match residual {
            Some(r) => r.matmul_add(&act, &p.down_proj, true)?,
            None => act.matmul(&p.down_proj, false, true)?,
        };
        Ok((
            y,
            MlpSaved {
                x: x.clone(),
                gate,
                up,
                act,
            },
        ))
    }

    /// `d_y [N, H]` → `d_x [N, H]` (fresh).
    pub fn backward_input(
        &self,
        p: &MlpParams,
        d_y: &Tensor,
        s: MlpSaved,
    ) -> Result<(Tensor, MlpDeferredW)> {
        let d_act = d_y.matmul(&p.down_proj, false, false)?;
        let (d_gate, d_up) = match (&s.gate, self.cfg.activation) {
            (Some(gate), Activation::SwiGlu) => {
                let (dg, du) = Tensor::swiglu_backward(gate, &s.up, &d_act)?;
                (Some(dg), du)
            }
            (_, Activation::Relu2) => (None, s.up.relu2_backward(&d_act)?),
            (_, Activation::Gelu) => (None, s.up.gelu_backward(&d_act)?),
            (None, Activation::SwiGlu) => {
                return Err(Error::SavedMismatch {
                    layer: "mlp",
                    rule: "SwiGLU saved no gate pre-activation",
                })
            }
        };
        let mut d_x = d_up.matmul(&p.up_proj, false, false)?;
        if let (Some(dg), Some(w)) = (&d_gate, &p.gate_proj) {
            d_x.matmul_acc(dg, w, false, false, 1.0)?;
        }
        Ok((
            d_x,
            MlpDeferredW {
                x: s.x,
                act: s.act,
                d_y: d_y.clone(),
                d_gate,
                d_up,
            },
        ))
    }

    /// Accumulates (+=) the weight gradients into `g`.
    pub fn backward_weight(&self, w: MlpDeferredW, g: &mut MlpParams) -> Result<()> {
        g.down_proj.matmul_acc(&w.d_y, &w.act, true, false, 1.0)?;
        g.up_proj.matmul_acc(&w.d_up, &w.x, true, false, 1.0)?;
        if let (Some(dg), Some(gg)) = (&w.d_gate, &mut g.gate_proj) {
            gg.matmul_acc(dg, &w.x, true, false, 1.0)?;
        }
        Ok(())
    }

    /// I then W (tests and simple callers).
    pub fn backward(
        &self,
        p: &MlpParams,
        d_y: &Tensor,
        s: MlpSaved,
        g: &mut MlpParams,
    ) -> Result<Tensor> {
        let (d_x, w) = self.backward_input(p, d_y, s)?;
        self.backward_weight(w, g)?;
        Ok(d_x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check, randn, Probe};
    use crate::init::zeros_like_params;

    fn case(activation: Activation) {
        let cfg = MlpConfig {
            d_model: 6,
            hidden: 10,
            activation,
        };
        let mlp = Mlp { cfg };
        let p = MlpParams::init(&cfg, &Init::new(7), "mlp", 0.5, 0.5).unwrap();
        let x = randn(1, &[5, 6], 1.0);
        let probe = Probe::new(2, &[5, 6]);
        let mut g = p.clone();
        zeros_like_params(&mut |f| g.visit_mut("mlp", f)).unwrap();
        let (_, s) = mlp.forward(&p, &x).unwrap();
        let d_x = mlp.backward(&p, &probe.r, s, &mut g).unwrap();
        check("d_x", &x, &d_x, |t| {
            probe.loss(&mlp.forward(&p, t).unwrap().0)
        });
        let mut grads = Vec::new();
        g.visit("mlp", &mut |n, t, _| grads.push((n.to_string(), t.clone())));
        for (name, grad) in grads {
            let mut base = None;
            p.visit("mlp", &mut |n, t, _| {
                if n == name {
                    base = Some(t.clone())
                }
            });
            let base = base.unwrap();
            check(&name, &base, &grad, |t| {
                let mut q = p.clone();
                q.visit_mut("mlp", &mut |n, v, _| {
                    if n == name {
                        *v = t.clone()
                    }
                });
                probe.loss(&mlp.forward(&q, &x).unwrap().0)
            });
        }
    }

    #[test]
    fn swiglu_mlp_backward_matches_finite_differences() {
        case(Activation::SwiGlu);
    }

    #[test]
    fn relu2_and_gelu_mlp_backward_match_finite_differences() {
        case(Activation::Relu2);
        case(Activation::Gelu);
    }
}
