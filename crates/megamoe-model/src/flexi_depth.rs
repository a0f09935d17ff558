//! FlexiDepth: per-token adaptive layer skipping with a light adapter (arXiv 2503.23798,
//! luoxuan-cs/Flexidepth). Applies to the last `adaptive_layers` layers.
//!
//! `depth_router` on `z = RMSNorm_in(x)` (`x [N, H]`):
//! ```text
//! paper:    g = σ(w_head · W_dec · tanh(RMSNorm_r(W_enc z)))
//! released: g = σ(w_head · W_dec · RMSNorm_r(tanh(W_enc z)))
//! ```
//! `W_enc [R, H]`, `W_dec [H, R]`, `w_head [1, H]`, `R = max(1, H // 16)` (seed
//! `flexidepth_router_shape`). A token takes the full path iff `g > τ` (`skip_mask` m = 1
//! for full). Both paths run on every token with static shapes and are mixed elementwise
//! (seed contract), so K and V of skipped tokens are still computed and read by later
//! queries ("KV kept"):
//! ```text
//! full: x' = x + Attn(N1(x));  y_full = x' + g · FFN(N2(x'))
//! skip: y_skip = x + (1−g) · Adapter(N2(x)),   Adapter = SwiGLU with F/16 hidden
//! y = m ⊙ y_full + (1−m) ⊙ y_skip
//! ```
//! The mask carries no gradient; `g` gets gradient through both mixes and the skip loss
//! (seed `flexidepth_skip_loss`, exact): `L_skip = mean_t (Σ_l g_{l,t})² / n_layers`, with
//! `n_layers` the number of adaptive layers whose scores are summed. Block assembly lives in
//! `block.rs`; this file holds the router, the adapter weights and the skip loss.

use megamoe_optim::ParamRole;
use megamoe_plan::{Activation, RouterOrder};
use megamoe_tensor::Tensor;

use crate::error::Result;
use crate::init::Init;
use crate::mlp::{MlpConfig, MlpParams};
use crate::norm::{RmsNorm, RmsNormSaved};

/// FlexiDepth settings of one adaptive layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlexiDepthConfig {
    /// H.
    pub d_model: usize,
    /// R = max(1, H // reduction).
    pub router_hidden: usize,
    /// Adapter SwiGLU width (ffn_hidden / 16 by default).
    pub adapter_hidden: usize,
    /// τ: full path iff g > τ.
    pub threshold: f32,
    /// Router op order.
    pub router_order: RouterOrder,
    /// RMSNorm ε.
    pub norm_eps: f32,
}

impl FlexiDepthConfig {
    /// The adapter's FFN shape.
    pub fn adapter(&self) -> MlpConfig {
        MlpConfig {
            d_model: self.d_model,
            hidden: self.adapter_hidden,
            activation: Activation::SwiGlu,
        }
    }
}

/// Router and adapter weights of one adaptive layer.
#[derive(Debug, Clone)]
pub struct FlexiDepthParams {
    /// RMSNorm_in weight `[H]`.
    pub norm_in: Tensor,
    /// `W_enc [R, H]`.
    pub enc: Tensor,
    /// RMSNorm_r weight `[R]`.
    pub norm_r: Tensor,
    /// `W_dec [H, R]`.
    pub dec: Tensor,
    /// `w_head [1, H]`.
    pub head: Tensor,
    /// Adapter SwiGLU.
    pub adapter: MlpParams,
}

impl FlexiDepthParams {
    /// Router matrices ~ N(0, std), norms = 1, adapter like a small FFN.
    pub fn init(c: &FlexiDepthConfig, init: &Init, prefix: &str, std: f32) -> Result<Self> {
        let (h, r) = (c.d_model, c.router_hidden);
        Ok(FlexiDepthParams {
            norm_in: init.full(&[h], 1.0)?,
            enc: init.randn(&format!("{prefix}.depth_router.enc.weight"), &[r, h], std)?,
            norm_r: init.full(&[r], 1.0)?,
            dec: init.randn(&format!("{prefix}.depth_router.dec.weight"), &[h, r], std)?,
            head: init.randn(&format!("{prefix}.depth_router.head.weight"), &[1, h], std)?,
            adapter: MlpParams::init(&c.adapter(), init, &format!("{prefix}.adapter"), std, std)?,
        })
    }

    /// `{prefix}.depth_router.{norm_in,enc,norm_r,dec,head}.weight`, `{prefix}.adapter.*`.
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        let r = format!("{prefix}.depth_router");
        f(
            &format!("{r}.norm_in.weight"),
            &self.norm_in,
            ParamRole::Norm,
        );
        f(&format!("{r}.enc.weight"), &self.enc, ParamRole::Matrix);
        f(&format!("{r}.norm_r.weight"), &self.norm_r, ParamRole::Norm);
        f(&format!("{r}.dec.weight"), &self.dec, ParamRole::Matrix);
        f(&format!("{r}.head.weight"), &self.head, ParamRole::Gate);
        self.adapter.visit(&format!("{prefix}.adapter"), f);
    }

    /// Mutable twin of [`FlexiDepthParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        let r = format!("{prefix}.depth_router");
        f(
            &format!("{r}.norm_in.weight"),
            &mut self.norm_in,
            ParamRole::Norm,
        );
        f(&format!("{r}.enc.weight"), &mut self.enc, ParamRole::Matrix);
        f(
            &format!("{r}.norm_r.weight"),
            &mut self.norm_r,
            ParamRole::Norm,
        );
        f(&format!("{r}.dec.weight"), &mut self.dec, ParamRole::Matrix);
        f(&format!("{r}.head.weight"), &mut self.head, ParamRole::Gate);
        self.adapter.visit_mut(&format!("{prefix}.adapter"), f);
    }
}

/// What the router's backward needs.
#[derive(Debug)]
pub struct DepthRouterSaved {
    z: RmsNormSaved,
    /// `z` itself `[N, H]`.
    zn: Tensor,
    /// `W_enc z` normed (paper) or tanh'd (released) … see `forward`.
    inner: RmsNormSaved,
    /// tanh output `[N, R]`.
    tanh: Tensor,
    /// Input of W_dec `[N, R]`.
    u: Tensor,
    /// `W_dec u` `[N, H]`.
    d: Tensor,
    /// Score `g [N, 1]`.
    g: Tensor,
}

/// What the router's weight gradient needs.
#[derive(Debug)]
pub struct DepthRouterDeferredW {
    zn: Tensor,
    u: Tensor,
    d: Tensor,
    d_s: Tensor,
    d_d: Tensor,
    d_e: Tensor,
    d_norm_in: Tensor,
    d_norm_r: Tensor,
}

/// The FlexiDepth `depth_router`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DepthRouter {
    /// Settings.
    pub cfg: FlexiDepthConfig,
}

impl DepthRouter {
    /// `x [N, H]` → `g [N]` in (0, 1).
    pub fn forward(&self, p: &FlexiDepthParams, x: &Tensor) -> Result<(Tensor, DepthRouterSaved)> {
        let norm = RmsNorm {
            eps: self.cfg.norm_eps,
        };
        let (zn, z) = norm.forward(x, Some(&p.norm_in))?;
        let e = zn.matmul(&p.enc, false, true)?;
        let (tanh, inner, u) = match self.cfg.router_order {
            RouterOrder::Paper => {
                let (n, inner) = norm.forward(&e, Some(&p.norm_r))?;
                let t = n.tanh()?;
                (t.clone(), inner, t)
            }
            RouterOrder::Released => {
                let t = e.tanh()?;
                let (n, inner) = norm.forward(&t, Some(&p.norm_r))?;
                (t, inner, n)
            }
        };
        let d = u.matmul(&p.dec, false, true)?;
        let g = d.matmul(&p.head, false, true)?.sigmoid()?;
        let n = g.dims()[0];
        Ok((
            g.reshape([n])?,
            DepthRouterSaved {
                z,
                zn,
                inner,
                tanh,
                u,
                d,
                g,
            },
        ))
    }

    /// `d_g [N]` → `d_x [N, H]` (fresh).
    pub fn backward_input(
        &self,
        p: &FlexiDepthParams,
        d_g: &Tensor,
        s: DepthRouterSaved,
    ) -> Result<(Tensor, DepthRouterDeferredW)> {
        let norm = RmsNorm {
            eps: self.cfg.norm_eps,
        };
        let n = s.g.dims()[0];
        let d_s = s.g.sigmoid_backward(&d_g.reshape([n, 1])?)?;
        let d_d = d_s.matmul(&p.head, false, false)?;
        let d_u = d_d.matmul(&p.dec, false, false)?;
        let mut d_norm_r = Tensor::zeros(
            p.norm_r.dims().to_vec(),
            megamoe_tensor::DType::F32,
            d_g.device(),
        )?;
        let d_e = match self.cfg.router_order {
            RouterOrder::Paper => {
                let d_n = s.tanh.tanh_backward(&d_u)?;
                norm.backward(&d_n, Some(&p.norm_r), &s.inner, Some(&mut d_norm_r))?
            }
            RouterOrder::Released => {
                let d_t = norm.backward(&d_u, Some(&p.norm_r), &s.inner, Some(&mut d_norm_r))?;
                s.tanh.tanh_backward(&d_t)?
            }
        };
        let d_zn = d_e.matmul(&p.enc, false, false)?;
        let mut d_norm_in = Tensor::zeros(
            p.norm_in.dims().to_vec(),
            megamoe_tensor::DType::F32,
            d_g.device(),
        )?;
        let d_x = norm.backward(&d_zn, Some(&p.norm_in), &s.z, Some(&mut d_norm_in))?;
        Ok((
            d_x,
            DepthRouterDeferredW {
                zn: s.zn,
                u: s.u,
                d: s.d,
                d_s,
                d_d,
                d_e,
                d_norm_in,
                d_norm_r,
            },
        ))
    }

    /// Accumulates (+=) the router's weight gradients into `g`.
    pub fn backward_weight(&self, w: DepthRouterDeferredW, g: &mut FlexiDepthParams) -> Result<()> {
        g.head.matmul_acc(&w.d_s, &w.d, true, false, 1.0)?;
        g.dec.matmul_acc(&w.d_d, &w.u, true, false, 1.0)?;
        g.enc.matmul_acc(&w.d_e, &w.zn, true, false, 1.0)?;
        g.norm_in.add_assign(&w.d_norm_in)?;
        g.norm_r.add_assign(&w.d_norm_r)?;
        Ok(())
    }
}

/// Skip loss (seed `flexidepth_skip_loss`, exact): `scores` are the per-layer usage scores
/// `g_l [N]`; `L_skip = mean_t (Σ_l g_{l,t})² / n_layers` with `n_layers = scores.len()`.
/// Returns `(L_skip, Σ_l g_l [N])`; `dL/dg_{l,t} = 2 (Σ_l g_{l,t}) / (n_layers · N)`.
pub fn flexi_depth_skip_loss(scores: &[&Tensor]) -> Result<(Tensor, Tensor)> {
    let (first, rest) = match scores.split_first() {
        Some(x) => x,
        None => {
            return Err(crate::error::Error::Config {
                field: "flexidepth.adaptive_layers",
                value: "0".into(),
                rule: "the skip loss needs at least one adaptive layer",
            })
        }
    };
    let mut sum = (*first).clone();
    for s in rest {
        sum = sum.add(s)?;
    }
    let loss = flexi_depth_skip_loss_of_sum(&sum, scores.len())?;
    Ok((loss, sum))
}

/// [`flexi_depth_skip_loss`] from the running sum `Σ_l g_l [N]` over `n_layers` adaptive
/// layers (a pipeline's head chunk reduces the sum its predecessors carried).
pub fn flexi_depth_skip_loss_of_sum(sum: &Tensor, n_layers: usize) -> Result<Tensor> {
    Ok(sum.square()?.mean_all()?.scale(1.0 / n_layers as f32)?)
}

/// Gradient of [`flexi_depth_skip_loss`] w.r.t. each `g_l` (the same `[N]` for every layer),
/// times `scale`.
pub fn flexi_depth_skip_loss_grad(sum: &Tensor, n_layers: usize, scale: f32) -> Result<Tensor> {
    let n = sum.numel() as f32;
    Ok(sum.scale(2.0 * scale / (n_layers as f32 * n))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check, randn, Probe};
    use megamoe_tensor::Device;

    #[test]
    fn skip_loss_matches_hand_computation() {
        // 2 layers, 3 tokens: g_0 = [0.9, 0.2, 0.5], g_1 = [0.7, 0.1, 0.5]
        // sums = [1.6, 0.3, 1.0]; squares = [2.56, 0.09, 1.0]; mean = 3.65/3; / 2 layers
        let g0 = Tensor::from_vec_f32(vec![0.9, 0.2, 0.5], [3], Device::Cpu).unwrap();
        let g1 = Tensor::from_vec_f32(vec![0.7, 0.1, 0.5], [3], Device::Cpu).unwrap();
        let (l, sum) = flexi_depth_skip_loss(&[&g0, &g1]).unwrap();
        let want = 3.65 / 3.0 / 2.0;
        assert!((l.to_scalar_f32().unwrap() as f64 - want).abs() < 1e-6);
        // dL/dg = 2·sum/(2·3) = sum/3
        let d = flexi_depth_skip_loss_grad(&sum, 2, 1.0)
            .unwrap()
            .to_host_f32()
            .unwrap();
        for (got, s) in d.iter().zip([1.6f32, 0.3, 1.0]) {
            assert!((got - s / 3.0).abs() < 1e-6);
        }
        assert!(flexi_depth_skip_loss(&[]).is_err());
    }

    fn router_case(order: RouterOrder) {
        let cfg = FlexiDepthConfig {
            d_model: 8,
            router_hidden: 3,
            adapter_hidden: 4,
            threshold: 0.5,
            router_order: order,
            norm_eps: 1e-5,
        };
        let r = DepthRouter { cfg };
        let mut p = FlexiDepthParams::init(&cfg, &Init::new(2), "l", 0.7).unwrap();
        p.norm_in = randn(8, &[8], 0.3).add_scalar(1.0).unwrap();
        p.norm_r = randn(9, &[3], 0.3).add_scalar(1.0).unwrap();
        let x = randn(3, &[5, 8], 1.0);
        let probe = Probe::new(4, &[5]);
        let (_, s) = r.forward(&p, &x).unwrap();
        let (d_x, w) = r.backward_input(&p, &probe.r, s).unwrap();
        let mut g = p.clone();
        crate::init::zeros_like_params(&mut |f| g.visit_mut("l", f)).unwrap();
        r.backward_weight(w, &mut g).unwrap();
        check("d_x", &x, &d_x, |t| {
            probe.loss(&r.forward(&p, t).unwrap().0)
        });
        let names = ["norm_in", "enc", "norm_r", "dec", "head"];
        let grads = [&g.norm_in, &g.enc, &g.norm_r, &g.dec, &g.head];
        let bases = [&p.norm_in, &p.enc, &p.norm_r, &p.dec, &p.head];
        for i in 0..5 {
            check(names[i], bases[i], grads[i], |t| {
                let mut q = p.clone();
                *[
                    &mut q.norm_in,
                    &mut q.enc,
                    &mut q.norm_r,
                    &mut q.dec,
                    &mut q.head,
                ][i] = t.clone();
                probe.loss(&r.forward(&q, &x).unwrap().0)
            });
        }
    }

    #[test]
    fn depth_router_backward_matches_finite_differences_in_both_orders() {
        router_case(RouterOrder::Paper);
        router_case(RouterOrder::Released);
    }

    #[test]
    fn router_hidden_is_seed_shape() {
        assert_eq!(megamoe_plan::flexidepth_router_hidden(64, 16), 4);
        assert_eq!(megamoe_plan::flexidepth_router_hidden(8, 16), 1);
    }
}
