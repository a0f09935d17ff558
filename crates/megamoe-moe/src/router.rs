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
use megamoe_tensor::{DType, Tensor};

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
    /// `[N, K]`: σ(z) for sigmoid, softmax of the chosen logits for softmax after top-k;
    /// unused (empty clone of `score`) for pre-softmax.
    g_raw: Tensor,
    /// `[N, Ep]` softmax(z_pool), kept for pre-softmax only.
    score: Option<Tensor>,
    /// `[N, K]` 1/0 real-slot mask; `Some` with null slots.
    real_mask: Option<Tensor>,
    /// `[N, K]` input of the normalisation (masked raw gates); `Some` iff normalize.
    g_masked: Option<Tensor>,
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

    /// Routing: pool logits → chosen slots and their gates.
    pub fn routing(&self, p: &RouterParams, logits: &Tensor) -> Result<(Routing, RouterSaved)> {
        let c = &self.cfg;
        let (e, pool, kk) = (c.num_routed_experts, c.pool_size(), c.slots_per_token());
        // 1. scores
        let score = match (c.score_fn, c.pre_softmax) {
            (ScoreFn::Sigmoid, _) => logits.sigmoid()?,
            (ScoreFn::Softmax, true) => logits.softmax()?,
            (ScoreFn::Softmax, false) => logits.clone(),
        };
        // 2. selection = score + bias (real experts only)
        let mut sel = score.clone();
        if let (true, Some(b)) = (c.expert_bias, &p.expert_bias) {
            let b_pool = if pool > e {
                let zeros = Tensor::zeros([pool - e], DType::F32, b.device())?;
                Tensor::cat(&[b, &zeros], 0)?
            } else {
                b.clone()
            };
            sel = sel.add_row(&b_pool)?;
        }
        // 3. group-limited mask, 4. top-K
        if let Some(g) = c.group_routing {
            sel = sel.group_limited_mask(g.n_groups, g.topk_groups)?;
        }
        let (_, slots) = sel.topk(kk)?;
        // 5. raw gates of the chosen slots
        let (g_raw, score_saved) = match (c.score_fn, c.pre_softmax) {
            (ScoreFn::Sigmoid, _) => (logits.gather_cols(&slots)?.sigmoid()?, None),
            (ScoreFn::Softmax, true) => (score.gather_cols(&slots)?, Some(score)),
            (ScoreFn::Softmax, false) => (logits.gather_cols(&slots)?.softmax()?, None),
        };
        // 6. null slots get gate 0; normalise among the real ones; scale
        let real_mask = if pool > e {
            Some(slots.real_slot_mask(e)?)
        } else {
            None
        };
        let g_masked = match &real_mask {
            Some(m) => g_raw.mul(m)?,
            None => g_raw.clone(),
        };
        let g_norm = if c.normalize {
            g_masked.normalize_rows(NORMALIZE_EPS)?
        } else {
            g_masked.clone()
        };
        let gates = g_norm.scale(c.route_scale)?;
        let saved = RouterSaved {
            slots: slots.clone(),
            g_raw,
            score: score_saved,
            real_mask,
            g_masked: c.normalize.then_some(g_masked),
        };
        Ok((
            Routing {
                slots,
                gates,
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

    /// d_gates `[N, K]` → d_z_pool `[N, Ep]` (written fresh), the choice held fixed.
    pub fn routing_backward(&self, saved: &RouterSaved, d_gates: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let pool = c.pool_size();
        let d_norm = d_gates.scale(c.route_scale)?;
        if let (ScoreFn::Softmax, Some(gm)) = (c.score_fn, &saved.g_masked) {
            return softmax_normalized_backward(saved, gm, &d_norm, pool);
        }
        let d_masked = match &saved.g_masked {
            Some(gm) => gm.normalize_rows_backward(&d_norm, NORMALIZE_EPS)?,
            None => d_norm,
        };
        let d_raw = match &saved.real_mask {
            Some(m) => d_masked.mul(m)?,
            None => d_masked,
        };
        Ok(match (c.score_fn, &saved.score) {
            (ScoreFn::Sigmoid, _) => saved
                .g_raw
                .sigmoid_backward(&d_raw)?
                .scatter_cols(&saved.slots, pool)?,
            (ScoreFn::Softmax, Some(s)) => {
                s.softmax_backward(&d_raw.scatter_cols(&saved.slots, pool)?)?
            }
            (ScoreFn::Softmax, None) => saved
                .g_raw
                .softmax_backward(&d_raw)?
                .scatter_cols(&saved.slots, pool)?,
        })
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

/// Backward of softmax scores followed by the renormalisation among the real picks, in
/// closed form. With `p` the softmax (over the pool, or over the K picked logits), `R` the
/// real picks, `S = Σ_R p`, `g = p / (S + ε)` on `R` (0 elsewhere) and `C = Σ_j g_j d_j`:
///
/// ```text
/// ∂L/∂z_i = [i ∈ R] · g_i (d_i − C) − p_i · ε/(S + ε) · C
/// ```
///
/// The gates are a ratio of softmax values, so every logit outside `R` (null slots, unpicked
/// experts) reaches them only through ε. Composing the two backwards instead computes that
/// near-zero term as `p_i · Σ_j p_j d'_j`, a sum that cancels to f32 rounding noise of the gate
/// gradient; in this form it is exact, and the null-slot logit's gradient is what the aux and
/// z losses give it.
fn softmax_normalized_backward(
    saved: &RouterSaved,
    g_masked: &Tensor,
    d_norm: &Tensor,
    pool: usize,
) -> Result<Tensor> {
    let g = g_masked.normalize_rows(NORMALIZE_EPS)?;
    let gd = g.mul(d_norm)?;
    let cross = gd.sum_last_dim()?;
    let picked = gd.sub(&g.mul_col(&cross)?)?;
    // ε/(S + ε) · C per token (0 when every pick is null: then C = 0)
    let eps_share = g_masked
        .sum_last_dim()?
        .add_scalar(NORMALIZE_EPS)?
        .recip()?
        .scale(NORMALIZE_EPS)?
        .mul(&cross)?;
    Ok(match &saved.score {
        Some(p) => picked
            .scatter_cols(&saved.slots, pool)?
            .sub(&p.mul_col(&eps_share)?)?,
        None => picked
            .sub(&saved.g_raw.mul_col(&eps_share)?)?
            .scatter_cols(&saved.slots, pool)?,
    })
}
