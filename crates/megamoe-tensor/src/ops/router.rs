//! The MoE router's routing step as one op: pool logits → chosen slots and gates, plus the
//! softmax and logsumexp of the logits that the router losses read.
//!
//! [`route_composed`] is the definition: the composition of the generic ops (softmax /
//! sigmoid, bias row, group-limited mask, top-k, gather, null-slot mask, row normalisation,
//! scale). The CPU backend runs it as is; a device backend may run it as one kernel (CUDA:
//! one thread per token) and must fall back to it for the modes its kernel does not take.

use crate::{DType, Error, Result, Tensor};

/// How the router scores its pool logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteScore {
    /// softmax over the pool before top-k; the gates are the chosen probabilities.
    Softmax,
    /// σ(z); the gates are the chosen σ values.
    Sigmoid,
    /// Top-k of the logits themselves; the gates are the softmax of the k chosen logits.
    SoftmaxAfterTopk,
}

/// The routing rule of [`Tensor::route`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteSpec {
    /// Routed experts `E`: pool slots `≥ E` are null copies (gate 0).
    pub n_real: usize,
    /// Slots per token `K` (`1..=pool`).
    pub k: usize,
    /// Scores.
    pub score: RouteScore,
    /// `(n_groups, topk_groups)`: the group-limited mask (DeepSeek-V3) before top-k.
    pub groups: Option<(usize, usize)>,
    /// Renormalise the gates among the real picks: `g / (Σ g + eps)`.
    pub normalize: bool,
    /// ε of the renormalisation.
    pub eps: f32,
    /// Gate multiplier (route_scale).
    pub scale: f32,
}

/// What [`Tensor::route`] returns (`N` tokens, `Ep` pool slots, `K` slots per token).
#[derive(Debug, Clone)]
pub struct Routed {
    /// `[N, K]` i32 chosen pool slots, best first (ties → lower slot).
    pub slots: Tensor,
    /// `[N, K]` f32 gates: masked, renormalised (if asked) and scaled.
    pub gates: Tensor,
    /// `[N, K]` f32 raw gates of the chosen slots (before mask, normalisation, scale).
    pub g_raw: Tensor,
    /// `[N, K]` f32 raw gates with null slots zeroed; `Some` iff `normalize`.
    pub g_masked: Option<Tensor>,
    /// `[N, K]` f32 1/0 real-slot mask; `Some` iff the pool has null copies.
    pub real_mask: Option<Tensor>,
    /// `[N, Ep]` f32 softmax of the logits (the scores for [`RouteScore::Softmax`]).
    pub probs: Tensor,
    /// `[N]` f32 logsumexp of the logits.
    pub lse: Tensor,
}

/// The definition of [`Tensor::route`] as a composition of generic ops (the CPU path, and a
/// device backend's fallback).
pub fn route_composed(logits: &Tensor, bias: Option<&Tensor>, spec: &RouteSpec) -> Result<Routed> {
    let (_, pool) = logits.dims2()?;
    let e = spec.n_real;
    let probs = logits.softmax()?;
    let lse = logits.logsumexp_last_dim()?;
    // 1. scores
    let score = match spec.score {
        RouteScore::Sigmoid => logits.sigmoid()?,
        RouteScore::Softmax => probs.clone(),
        RouteScore::SoftmaxAfterTopk => logits.clone(),
    };
    // 2. selection = score + bias (real experts only)
    let mut sel = score.clone();
    if let Some(b) = bias {
        let b_pool = if pool > e {
            let zeros = Tensor::zeros([pool - e], DType::F32, b.device())?;
            Tensor::cat(&[b, &zeros], 0)?
        } else {
            b.clone()
        };
        sel = sel.add_row(&b_pool)?;
    }
    // 3. group-limited mask, 4. top-K
    if let Some((g, m)) = spec.groups {
        sel = sel.group_limited_mask(g, m)?;
    }
    let (_, slots) = sel.topk(spec.k)?;
    // 5. raw gates of the chosen slots
    let g_raw = match spec.score {
        RouteScore::Sigmoid => logits.gather_cols(&slots)?.sigmoid()?,
        RouteScore::Softmax => score.gather_cols(&slots)?,
        RouteScore::SoftmaxAfterTopk => logits.gather_cols(&slots)?.softmax()?,
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
    let g_norm = if spec.normalize {
        g_masked.normalize_rows(spec.eps)?
    } else {
        g_masked.clone()
    };
    let gates = g_norm.scale(spec.scale)?;
    Ok(Routed {
        slots,
        gates,
        g_raw,
        g_masked: spec.normalize.then_some(g_masked),
        real_mask,
        probs,
        lse,
    })
}

/// What [`Tensor::route_backward`] reads of the forward's [`Routed`].
#[derive(Debug, Clone, Copy)]
pub struct RouteSaved<'a> {
    /// [`Routed::slots`].
    pub slots: &'a Tensor,
    /// [`Routed::g_raw`].
    pub g_raw: &'a Tensor,
    /// [`Routed::g_masked`].
    pub g_masked: Option<&'a Tensor>,
    /// [`Routed::real_mask`].
    pub real_mask: Option<&'a Tensor>,
    /// [`Routed::probs`].
    pub probs: &'a Tensor,
}

impl<'a> From<&'a Routed> for RouteSaved<'a> {
    fn from(r: &'a Routed) -> RouteSaved<'a> {
        RouteSaved {
            slots: &r.slots,
            g_raw: &r.g_raw,
            g_masked: r.g_masked.as_ref(),
            real_mask: r.real_mask.as_ref(),
            probs: &r.probs,
        }
    }
}

/// Router-loss gradient terms that [`Tensor::route_backward`] adds to the gate gradient
/// (both through `probs`, the softmax of the logits), in this order.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteLossGrads<'a> {
    /// `(coeff [N, Ep], s)`: adds `probs.softmax_backward(coeff · s)` (a balancing loss
    /// linear in the softmax probabilities, with `coeff` its ∂/∂p).
    pub aux: Option<(&'a Tensor, f32)>,
    /// `(lse [N], s)`: adds `probs · (lse · s)` per row (the z-loss, `s = 2·weight/N`).
    pub z: Option<(&'a Tensor, f32)>,
}

/// The definition of [`Tensor::route_backward`] as a composition of generic ops (the CPU
/// path, and a device backend's fallback). `d_gates [N, K]` → `d_z [N, Ep]`.
pub fn route_backward_composed(
    d_gates: &Tensor,
    saved: RouteSaved<'_>,
    spec: &RouteSpec,
    losses: RouteLossGrads<'_>,
) -> Result<Tensor> {
    let mut d_z = gate_backward_composed(d_gates, saved, spec)?;
    if let Some((coeff, s)) = losses.aux {
        d_z.add_assign(&saved.probs.softmax_backward(&coeff.scale(s)?)?)?;
    }
    if let Some((lse, s)) = losses.z {
        d_z.add_assign(&saved.probs.mul_col(&lse.scale(s)?)?)?;
    }
    Ok(d_z)
}

/// The gradient through the gates alone (no loss terms).
fn gate_backward_composed(
    d_gates: &Tensor,
    saved: RouteSaved<'_>,
    spec: &RouteSpec,
) -> Result<Tensor> {
    let (_, pool) = saved.probs.dims2()?;
    let d_norm = d_gates.scale(spec.scale)?;
    if let (RouteScore::Softmax | RouteScore::SoftmaxAfterTopk, Some(gm)) =
        (spec.score, saved.g_masked)
    {
        return softmax_normalized_backward(saved, gm, &d_norm, pool, spec);
    }
    let d_masked = match saved.g_masked {
        Some(gm) => gm.normalize_rows_backward(&d_norm, spec.eps)?,
        None => d_norm,
    };
    let d_raw = match saved.real_mask {
        Some(m) => d_masked.mul(m)?,
        None => d_masked,
    };
    match spec.score {
        RouteScore::Sigmoid => saved
            .g_raw
            .sigmoid_backward(&d_raw)?
            .scatter_cols(saved.slots, pool),
        RouteScore::Softmax => saved
            .probs
            .softmax_backward(&d_raw.scatter_cols(saved.slots, pool)?),
        RouteScore::SoftmaxAfterTopk => saved
            .g_raw
            .softmax_backward(&d_raw)?
            .scatter_cols(saved.slots, pool),
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
/// gradient; in this form it is exact, and the null-slot logit's gradient is what the router
/// losses give it.
fn softmax_normalized_backward(
    saved: RouteSaved<'_>,
    g_masked: &Tensor,
    d_norm: &Tensor,
    pool: usize,
    spec: &RouteSpec,
) -> Result<Tensor> {
    let eps = spec.eps;
    let g = g_masked.normalize_rows(eps)?;
    let gd = g.mul(d_norm)?;
    let cross = gd.sum_last_dim()?;
    let picked = gd.sub(&g.mul_col(&cross)?)?;
    // ε/(S + ε) · C per token (0 when every pick is null: then C = 0)
    let eps_share = g_masked
        .sum_last_dim()?
        .add_scalar(eps)?
        .recip()?
        .scale(eps)?
        .mul(&cross)?;
    match spec.score {
        RouteScore::Softmax => picked
            .scatter_cols(saved.slots, pool)?
            .sub(&saved.probs.mul_col(&eps_share)?),
        _ => picked
            .sub(&saved.g_raw.mul_col(&eps_share)?)?
            .scatter_cols(saved.slots, pool),
    }
}

impl Tensor {
    /// Backward of [`Tensor::route`] with the choice held fixed: `self` is `d_gates [N, K]`
    /// (the gradient of [`Routed::gates`]); returns `d_z [N, Ep]` (written fresh), the
    /// gradient of the pool logits through the gates (the bias and the group mask choose,
    /// they carry no gradient), plus the router-loss terms of `losses`. Semantics:
    /// [`route_backward_composed`].
    pub fn route_backward(
        &self,
        saved: RouteSaved<'_>,
        spec: &RouteSpec,
        losses: RouteLossGrads<'_>,
    ) -> Result<Tensor> {
        const OP: &str = "route_backward";
        self.same_shape(OP, saved.slots)?;
        self.same_shape(OP, saved.g_raw)?;
        let (_, k) = self
            .dims2()
            .map_err(|_| self.rank_error(OP, "d_gates", 2))?;
        let (n, _) = saved
            .probs
            .dims2()
            .map_err(|_| saved.probs.rank_error(OP, "probs", 2))?;
        if self.dims() != [n, spec.k] || k != spec.k {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: saved.probs.dims().to_vec(),
                rule: "d_gates must be [N, K] for probs [N, Ep]",
            });
        }
        if let Some((coeff, _)) = losses.aux {
            saved.probs.same_shape(OP, coeff)?;
        }
        if let Some((lse, _)) = losses.z {
            if lse.dims() != [n] {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    lhs: saved.probs.dims().to_vec(),
                    rhs: lse.dims().to_vec(),
                    rule: "lse must be [N] for probs [N, Ep]",
                });
            }
        }
        self.backend().route_backward(self, saved, spec, losses)
    }

    /// Routing of pool logits `self [N, Ep]` (`bias [E]` optional: selection only) by
    /// `spec`: per token the score `s` (softmax, σ, or the logits), the selection `s + b`
    /// (null copies get no bias), the group-limited mask, top-K (ties → lower slot), the raw
    /// gates of the chosen slots (σ, the probability, or the softmax of the K chosen logits),
    /// null slots zeroed, renormalised among the real picks and scaled. Also returns the
    /// softmax and logsumexp of the logits (see [`Routed`]). Semantics: [`route_composed`].
    pub fn route(&self, bias: Option<&Tensor>, spec: &RouteSpec) -> Result<Routed> {
        const OP: &str = "route";
        let (_, pool) = self.dims2().map_err(|_| self.rank_error(OP, "logits", 2))?;
        let invalid =
            |arg: &'static str, value: usize, rule: &'static str| Error::InvalidArgument {
                op: OP,
                arg,
                value: value.to_string(),
                rule,
            };
        if spec.k == 0 || spec.k > pool {
            return Err(invalid("k", spec.k, "must be in 1..=pool slots"));
        }
        if spec.n_real > pool {
            return Err(invalid("n_real", spec.n_real, "must be <= the pool slots"));
        }
        if let Some(b) = bias {
            self.same_device(OP, b)?;
            if b.dims() != [spec.n_real] {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    lhs: self.dims().to_vec(),
                    rhs: b.dims().to_vec(),
                    rule: "bias must be [E] (the real experts of the pool)",
                });
            }
        }
        self.backend().route(self, bias, spec)
    }
}
