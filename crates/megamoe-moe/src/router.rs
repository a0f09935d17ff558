//! The router: gating (logits), then routing (scores, selection, gates).
//!
//! Shapes: `N` tokens, `H` model width, `E` routed experts, `Ep = E + n_null` pool slots,
//! `K` slots per token (k, or k_max with null slots).
//!
//! Gating: `z = x · Wrᵀ` (`Wr [E, H]`); with null slots one more learned row `w_null
//! [1, H]` gives one logit replicated `n_null` times: `z_pool [N, Ep]`.
//!
//! Routing (MOE_DECISIONS §2-7):
//! - score `s`: softmax(z_pool) (pre_softmax), σ(z_pool) (sigmoid), or the logits themselves
//!   (softmax after top-k);
//! - selection = s + b (expert bias on real experts only, null copies 0), then the
//!   group-limited mask (DeepSeek-V3), then top-K (ties → lower slot index);
//! - gates of the chosen slots: s\[chosen\] (softmax after top-k: softmax of the K chosen
//!   logits); null slots get gate 0; if `normalize`, g /= (Σ real g + 1e-20); g *= route_scale.
//!
//! Bias and the group mask change *which* slots are chosen, never the gate values, so the
//! gates are differentiable functions of `z_pool` with the choice held fixed. Router math is
//! f32 (reductions inside ops accumulate in f64).
//!
//! Backward: [`Router::routing_backward`] maps d_gates `[N, K]` to d_z_pool `[N, Ep]`;
//! loss gradients (aux, z) add to d_z_pool; then [`Router::gating_backward_input`] gives
//! d_x (written fresh) and [`Router::gating_backward_weight`] accumulates dWr, dw_null.

use megamoe_plan::ScoreFn;
use megamoe_tensor::ops::router::{RouteLossGrads, RouteSaved, RouteScore, RouteSpec};
use megamoe_tensor::Tensor;

use crate::config::RouterConfig;
use crate::error::{check_shape, Result};

/// ε of the gate renormalisation g / (Σ g + ε) (Megatron/DeepSeek use 1e-20: it only
/// matters for a token whose chosen gates are all 0, e.g. all null slots).
pub const NORMALIZE_EPS: f32 = 1e-20;

/// A global routed-expert id (index into the expert bank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertId(pub usize);

/// What one top-K slot of a token chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// A routed expert.
    Expert(ExpertId),
    /// A null slot: no expert, no compute, no output.
    Null,
}

impl Slot {
    /// Decodes a pool index: `< num_routed_experts` is an expert, anything above a null copy.
    pub fn from_pool_index(index: usize, num_routed_experts: usize) -> Slot {
        if index < num_routed_experts {
            Slot::Expert(ExpertId(index))
        } else {
            Slot::Null
        }
    }
}

/// Router weights.
#[derive(Debug, Clone)]
pub struct RouterParams {
    /// Wr `[E, H]`.
    pub weight: Tensor,
    /// w_null `[1, H]`: the shared logit row of the null copies; `Some` iff null slots are on.
    pub null_weight: Option<Tensor>,
    /// b `[E]`: expert-bias BUFFER (selection only, no gradient, not an optimizer param);
    /// `Some` iff `moe.expert_bias`. Always `None` in a gradient copy.
    pub expert_bias: Option<Tensor>,
}

/// The routing decision of one call.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[N, K]` i32: chosen pool slots per token, best first (`≥ E` = null slot).
    pub slots: Tensor,
    /// `[N, K]` f32: gate per chosen slot (0 on null slots), before capacity.
    pub gates: Tensor,
    /// `[N, Ep]` f32: pool logits (the losses read them).
    pub logits: Tensor,
}

/// What [`Router::routing_backward`] needs.
#[derive(Debug, Clone)]
pub struct RouterSaved {
    /// `[N, K]` i32 chosen slots.
    slots: Tensor,
    /// `[N, K]` raw gates: σ(z), the chosen probabilities (pre-softmax) or the softmax of
    /// the chosen logits (softmax after top-k).
    g_raw: Tensor,
    /// `[N, K]` 1/0 real-slot mask; `Some` with null slots.
    real_mask: Option<Tensor>,
    /// `[N, K]` input of the normalisation (masked raw gates); `Some` iff normalize.
    g_masked: Option<Tensor>,
    /// `[N, Ep]` softmax(z_pool) (the router losses read it).
    probs: Tensor,
    /// `[N]` logsumexp(z_pool) (the z-loss reads it).
    lse: Tensor,
}

impl RouterSaved {
    /// `[N, Ep]` softmax of the pool logits, computed by the routing op.
    pub fn probs(&self) -> &Tensor {
        &self.probs
    }

    /// `[N]` logsumexp of the pool logits, computed by the routing op.
    pub fn lse(&self) -> &Tensor {
        &self.lse
    }
}

/// The MoE router.
#[derive(Debug, Clone)]
pub struct Router {
    cfg: RouterConfig,
}

impl Router {
    /// A router for `cfg`.
    pub fn new(cfg: RouterConfig) -> Router {
        Router { cfg }
    }

    /// Its config.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Checks parameter shapes against the config.
    pub fn check_params(&self, p: &RouterParams) -> Result<()> {
        let (e, h) = (self.cfg.num_routed_experts, self.cfg.d_model);
        check_shape("router.weight", &p.weight, &[e, h])?;
        match (&p.null_weight, self.cfg.null_slots.is_some()) {
            (Some(w), true) => check_shape("router.null_weight", w, &[1, h])?,
            (None, false) => {}
            (got, _) => {
                return Err(crate::Error::ParamShape {
                    what: "router.null_weight",
                    expected: if self.cfg.null_slots.is_some() {
                        vec![1, h]
                    } else {
                        vec![]
                    },
                    got: got.as_ref().map_or(vec![], |t| t.dims().to_vec()),
                })
            }
        }
        if let (Some(b), true) = (&p.expert_bias, self.cfg.expert_bias) {
            check_shape("router.expert_bias", b, &[e])?;
        }
        Ok(())
    }

    /// Gating: `x [N, H]` → pool logits `z_pool [N, Ep]`.
    pub fn gating(&self, p: &RouterParams, x: &Tensor) -> Result<Tensor> {
        let z = x.matmul(&p.weight, false, true)?;
        match (&p.null_weight, self.cfg.null_slots) {
            (Some(wn), Some(ns)) => {
                let zn = x.matmul(wn, false, true)?;
                Ok(z.expand_null_slots(&zn, ns.n_null_copies)?)
            }
            _ => Ok(z),
        }
    }

    /// The routing rule of this router as the tensor op's spec.
    pub fn route_spec(&self) -> RouteSpec {
        let c = &self.cfg;
        RouteSpec {
            n_real: c.num_routed_experts,
            k: c.slots_per_token(),
            score: match (c.score_fn, c.pre_softmax) {
                (ScoreFn::Sigmoid, _) => RouteScore::Sigmoid,
                (ScoreFn::Softmax, true) => RouteScore::Softmax,
                (ScoreFn::Softmax, false) => RouteScore::SoftmaxAfterTopk,
            },
            groups: c.group_routing.map(|g| (g.n_groups, g.topk_groups)),
            normalize: c.normalize,
            eps: NORMALIZE_EPS,
            scale: c.route_scale,
        }
    }

    /// Routing: pool logits → chosen slots and their gates, in one op ([`Tensor::route`]:
    /// one kernel on CUDA; the composed ops on the CPU).
    pub fn routing(&self, p: &RouterParams, logits: &Tensor) -> Result<(Routing, RouterSaved)> {
        let c = &self.cfg;
        let bias = match (c.expert_bias, &p.expert_bias) {
            (true, Some(b)) => Some(b),
            _ => None,
        };
        let r = logits.route(bias, &self.route_spec())?;
        let saved = RouterSaved {
            slots: r.slots.clone(),
            g_raw: r.g_raw,
            real_mask: r.real_mask,
            g_masked: r.g_masked,
            probs: r.probs,
            lse: r.lse,
        };
        Ok((
            Routing {
                slots: r.slots,
                gates: r.gates,
                logits: logits.clone(),
            },
            saved,
        ))
    }

    /// Gating then routing.
    pub fn forward(&self, p: &RouterParams, x: &Tensor) -> Result<(Routing, RouterSaved)> {
        self.check_params(p)?;
        let z = self.gating(p, x)?;
        self.routing(p, &z)
    }

    /// d_gates `[N, K]` → d_z_pool `[N, Ep]` (written fresh), the choice held fixed
    /// ([`Tensor::route_backward`]: one kernel on CUDA; on the CPU the composed ops, with
    /// softmax scores renormalised among the real picks in closed form, exact through ε).
    pub fn routing_backward(&self, saved: &RouterSaved, d_gates: &Tensor) -> Result<Tensor> {
        self.routing_backward_with(saved, d_gates, RouteLossGrads::default())
    }

    /// [`Router::routing_backward`] plus router-loss terms through the softmax of the
    /// logits (added in the same op: one kernel on CUDA).
    pub fn routing_backward_with(
        &self,
        saved: &RouterSaved,
        d_gates: &Tensor,
        losses: RouteLossGrads<'_>,
    ) -> Result<Tensor> {
        let s = RouteSaved {
            slots: &saved.slots,
            g_raw: &saved.g_raw,
            g_masked: saved.g_masked.as_ref(),
            real_mask: saved.real_mask.as_ref(),
            probs: &saved.probs,
        };
        Ok(d_gates.route_backward(s, &self.route_spec(), losses)?)
    }

    /// d_z_pool `[N, Ep]` → d_x `[N, H]` (written fresh).
    pub fn gating_backward_input(&self, p: &RouterParams, d_logits: &Tensor) -> Result<Tensor> {
        let e = self.cfg.num_routed_experts;
        match &p.null_weight {
            Some(wn) if self.cfg.null_slots.is_some() => {
                let (dz, dn) = d_logits.reduce_null_slots(e)?;
                let mut dx = dz.matmul(&p.weight, false, false)?;
                dx.matmul_acc(&dn, wn, false, false, 1.0)?;
                Ok(dx)
            }
            _ => Ok(d_logits.matmul(&p.weight, false, false)?),
        }
    }

    /// [`Router::gating_backward_input`] accumulated (+=) into `d_x [N, H]` by the GEMMs
    /// themselves (no separate `[N, H]` product and sum).
    pub fn gating_backward_input_acc(
        &self,
        p: &RouterParams,
        d_logits: &Tensor,
        d_x: &mut Tensor,
    ) -> Result<()> {
        let e = self.cfg.num_routed_experts;
        match &p.null_weight {
            Some(wn) if self.cfg.null_slots.is_some() => {
                let (dz, dn) = d_logits.reduce_null_slots(e)?;
                d_x.matmul_acc(&dz, &p.weight, false, false, 1.0)?;
                d_x.matmul_acc(&dn, wn, false, false, 1.0)?;
            }
            _ => d_x.matmul_acc(d_logits, &p.weight, false, false, 1.0)?,
        }
        Ok(())
    }

    /// Accumulates (+=) dWr = d_zᵀ x and dw_null = d_nullᵀ x into `grads`.
    pub fn gating_backward_weight(
        &self,
        x: &Tensor,
        d_logits: &Tensor,
        grads: &mut RouterParams,
    ) -> Result<()> {
        let e = self.cfg.num_routed_experts;
        if self.cfg.null_slots.is_some() {
            let (dz, dn) = d_logits.reduce_null_slots(e)?;
            grads.weight.matmul_acc(&dz, x, true, false, 1.0)?;
            if let Some(gn) = grads.null_weight.as_mut() {
                gn.matmul_acc(&dn, x, true, false, 1.0)?;
            }
        } else {
            grads.weight.matmul_acc(d_logits, x, true, false, 1.0)?;
        }
        Ok(())
    }
}
