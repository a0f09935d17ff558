//! Router losses and their collection (spec "Losses"; MOE_DECISIONS §11).
//!
//! Symbols: `N` tokens, `Ep` pool slots (E, or E + n_null with null slots), `K` picks per
//! token (k or k_max), `z [N, Ep]` pool logits, `S` tokens per segment.
//!
//! - Switch aux loss (Fedus et al. 2101.03961; Megatron `switch_load_balancing_loss_func`):
//!   `aux = Ep · Σ_i f_i · P_i`, `f_i = count_i / (K·N)` with `count_i` the picks of slot i
//!   BEFORE capacity (a constant), `P_i = (1/N) Σ_t p_{t,i}`, `p = softmax(z)` (softmax
//!   scores, either pre_softmax) or `σ(z) / Σ_j σ(z_j)` (sigmoid); no bias, no group mask.
//!   Gradient flows through `P` only: `∂aux/∂p_{t,i} = Ep · f_i / N`.
//!   Checks: uniform routing gives 1 (·c_aux once weighted); total collapse gives Ep.
//! - seq_aux (DeepSeek-V2/V3): the same over each sequence of `S` tokens (its own `f`, `P`),
//!   averaged over the `N / S` sequences.
//! - global_aux: counts all-reduced over DP×TP×CP in a distributed step; in one call it is
//!   exactly `aux`. The hook is [`AuxLossKind::GlobalAux`] here; the all-reduce of the
//!   counts joins when the layer runs under expert/data parallelism.
//! - z-loss (ST-MoE 2202.08906): `L_z = (1/N) Σ_t (logsumexp_j z_{t,j})²`;
//!   `∂L_z/∂z_{t,j} = (2/N) · lse_t · softmax(z_t)_j`. Check: zero logits give (ln Ep)².
//!
//! Every `*_forward` returns the UNWEIGHTED loss as a rank-0 tensor plus what its
//! `*_backward` needs; `*_backward(saved, scale)` returns `scale · ∂L/∂z` `[N, Ep]`
//! (written fresh), where `scale` = loss weight / (grad_accum · num_chunks)
//! ([`RouterLossScale`]), applied exactly once.
//!
//! Collection (seed `moe_loss_collection_sample.py`): per micro-batch,
//! `total = Σ_layers (aux_weight · aux_l + z_weight · z_l)` ([`collect_router_losses`],
//! defaults 0.01 / 1e-3, empty → 0); a step reports `Σ_micro-batches total / (grad_accum ·
//! num_chunks)` ([`StepRouterLoss`]), the same 1/(grad_accum·num_chunks) the gradients carry.

use megamoe_plan::{AuxLossKind, ScoreFn};
use megamoe_tensor::{DType, Tensor};

use crate::error::{Error, Result};

/// What [`aux_loss_backward`] needs.
#[derive(Debug, Clone)]
pub struct AuxLossSaved {
    /// `[N, Ep]` ∂aux/∂p (constant given the routing).
    coeff: Tensor,
    /// `[N, Ep]` p (softmax) or σ(z) (sigmoid, the input of the row normalisation).
    probs_or_sigmoid: Tensor,
    score_fn: ScoreFn,
}

impl AuxLossSaved {
    /// `(∂aux/∂p, scale)` as a term of the fused router backward
    /// ([`RouteLossGrads::aux`](megamoe_tensor::ops::router::RouteLossGrads)): the same
    /// value as [`aux_loss_backward`] when `p` is the softmax of the logits (softmax
    /// scores); `None` for sigmoid scores.
    pub fn softmax_grad_term(&self, scale: f32) -> Option<(&Tensor, f32)> {
        (self.score_fn == ScoreFn::Softmax).then_some((&self.coeff, scale))
    }
}

/// The balancing-loss probabilities `p [N, Ep]` (and σ(z) for sigmoid); `softmax` is
/// softmax(logits) when the caller already has it (the routing op computes it).
fn balance_probs(
    score_fn: ScoreFn,
    logits: &Tensor,
    softmax: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    Ok(match score_fn {
        ScoreFn::Softmax => {
            let p = match softmax {
                Some(p) => p.clone(),
                None => logits.softmax()?,
            };
            (p.clone(), p)
        }
        ScoreFn::Sigmoid => {
            let s = logits.sigmoid()?;
            (s.normalize_rows(0.0)?, s)
        }
    })
}

/// Balancing loss. `logits [N, Ep]`, `slots [N, K]` (picks before capacity), `seq_len` S
/// for seq_aux. Returns (`aux` rank-0, saved); `None` saved for [`AuxLossKind::None`].
pub fn aux_loss_forward(
    kind: AuxLossKind,
    score_fn: ScoreFn,
    logits: &Tensor,
    slots: &Tensor,
    seq_len: usize,
) -> Result<(Tensor, Option<AuxLossSaved>)> {
    aux_loss_forward_with(kind, score_fn, logits, slots, seq_len, AuxInputs::default())
}

/// What the caller of [`aux_loss_forward_with`] already computed from the same logits and
/// slots; each `Some` saves the op that would recompute it, with the same values.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuxInputs<'a> {
    /// `softmax(logits) [N, Ep]` ([`RouterSaved::probs`](crate::router::RouterSaved::probs)).
    pub softmax: Option<&'a Tensor>,
    /// `slots.slot_counts(None, Ep, N)` `[1, Ep]`: the picks per pool slot of the whole
    /// call (read when the loss's segment is the whole call: aux, global_aux).
    pub picks_per_slot: Option<&'a Tensor>,
}

/// [`aux_loss_forward`] reusing what the caller already has ([`AuxInputs`]).
pub fn aux_loss_forward_with(
    kind: AuxLossKind,
    score_fn: ScoreFn,
    logits: &Tensor,
    slots: &Tensor,
    seq_len: usize,
    have: AuxInputs<'_>,
) -> Result<(Tensor, Option<AuxLossSaved>)> {
    let (n, ep) = logits.dims2()?;
    let kk = slots.dim(1)?;
    if kind == AuxLossKind::None || n == 0 {
        return Ok((Tensor::scalar(0.0, logits.device())?, None));
    }
    let seg = match kind {
        AuxLossKind::SeqAux => seq_len,
        _ => n,
    };
    if seg == 0 || !n.is_multiple_of(seg) {
        return Err(Error::Tokens {
            tokens: n,
            rule: format!("seq_aux needs T to be a multiple of model.seq_len={seq_len}"),
        });
    }
    let n_seg = n / seg;
    // count [n_seg, Ep] → ∂aux/∂p_{t,i} = (1/n_seg) · Ep · f_{s,i} / S, f = count/(K·S).
    let counts = match have.picks_per_slot {
        Some(c) if seg == n && c.dims() == [1, ep] => c.clone(),
        _ => slots.slot_counts(None, ep, seg)?,
    };
    let per_seg =
        counts.scale((ep as f64 / (kk as f64 * seg as f64 * seg as f64 * n_seg as f64)) as f32)?;
    let coeff = if n_seg == 1 {
        let ones = Tensor::zeros([n], DType::I32, logits.device())?;
        per_seg.index_select(&ones)?
    } else {
        let seg_of_token: Vec<i32> = (0..n).map(|t| (t / seg) as i32).collect();
        per_seg.index_select(&Tensor::from_vec_i32(seg_of_token, [n], logits.device())?)?
    };
    let (p, s) = balance_probs(score_fn, logits, have.softmax)?;
    let aux = coeff.mul(&p)?.sum_all()?;
    Ok((
        aux,
        Some(AuxLossSaved {
            coeff,
            probs_or_sigmoid: s,
            score_fn,
        }),
    ))
}

/// `scale · ∂aux/∂z` `[N, Ep]`, through `P` only.
pub fn aux_loss_backward(saved: &AuxLossSaved, scale: f32) -> Result<Tensor> {
    let d_p = saved.coeff.scale(scale)?;
    Ok(match saved.score_fn {
        ScoreFn::Softmax => saved.probs_or_sigmoid.softmax_backward(&d_p)?,
        ScoreFn::Sigmoid => {
            let s = &saved.probs_or_sigmoid;
            s.sigmoid_backward(&s.normalize_rows_backward(&d_p, 0.0)?)?
        }
    })
}

/// What [`z_loss_backward`] needs.
#[derive(Debug, Clone)]
pub struct ZLossSaved {
    /// `[N, Ep]` softmax(z).
    softmax: Tensor,
    /// `[N]` logsumexp_j z.
    lse: Tensor,
}

/// z-loss `(1/N) Σ_t lse_t²` (rank-0) of `logits [N, Ep]`.
pub fn z_loss_forward(logits: &Tensor) -> Result<(Tensor, ZLossSaved)> {
    z_loss_forward_from(logits.softmax()?, logits.logsumexp_last_dim()?)
}

/// [`z_loss_forward`] from `softmax = softmax(z) [N, Ep]` and `lse = logsumexp(z) [N]`,
/// as the routing op computes them ([`RouterSaved::probs`](crate::router::RouterSaved::probs),
/// [`RouterSaved::lse`](crate::router::RouterSaved::lse)).
pub fn z_loss_forward_from(softmax: Tensor, lse: Tensor) -> Result<(Tensor, ZLossSaved)> {
    let z = if lse.numel() == 0 {
        Tensor::scalar(0.0, lse.device())?
    } else {
        lse.square()?.mean_all()?
    };
    Ok((z, ZLossSaved { softmax, lse }))
}

/// `scale · ∂L_z/∂z = scale · (2/N) · lse_t · softmax(z_t)` `[N, Ep]`.
pub fn z_loss_backward(saved: &ZLossSaved, scale: f32) -> Result<Tensor> {
    let (lse, s) = saved.grad_term(scale);
    Ok(saved.softmax.mul_col(&lse.scale(s)?)?)
}

impl ZLossSaved {
    /// `(lse, scale · 2/N)`: [`z_loss_backward`] as a term of the fused router backward
    /// ([`RouteLossGrads::z`](megamoe_tensor::ops::router::RouteLossGrads)), through the
    /// same softmax.
    pub fn grad_term(&self, scale: f32) -> (&Tensor, f32) {
        let n = self.lse.numel().max(1);
        (&self.lse, 2.0 * scale / n as f32)
    }
}

/// Weights of the router losses in the total (seed defaults 0.01 and 1e-3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterLossWeights {
    /// Balancing-loss weight.
    pub aux: f64,
    /// z-loss weight.
    pub z: f64,
}

impl Default for RouterLossWeights {
    fn default() -> Self {
        RouterLossWeights { aux: 0.01, z: 1e-3 }
    }
}

/// Unweighted router losses of one MoE layer for one micro-batch (host values).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayerRouterLosses {
    /// aux (or seq_aux / global_aux) value.
    pub aux: f64,
    /// z-loss value.
    pub z: f64,
}

/// Seed `collect`: `Σ_layers (w.aux · aux_l + w.z · z_l)`; an empty list gives 0.
pub fn collect_router_losses(layers: &[LayerRouterLosses], w: RouterLossWeights) -> f64 {
    layers.iter().map(|l| w.aux * l.aux + w.z * l.z).sum()
}

/// The factor each router-loss gradient carries into `backward_input`:
/// `weight / (grad_accum · num_chunks)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterLossScale {
    /// Multiplier of ∂aux/∂z.
    pub aux: f32,
    /// Multiplier of ∂L_z/∂z.
    pub z: f32,
}

impl RouterLossScale {
    /// `weights / (grad_accum · num_chunks)`; both counts must be ≥ 1.
    pub fn new(w: RouterLossWeights, grad_accum: usize, num_chunks: usize) -> Result<Self> {
        let per = micro_batch_factor(grad_accum, num_chunks)?;
        Ok(RouterLossScale {
            aux: (w.aux * per) as f32,
            z: (w.z * per) as f32,
        })
    }

    /// No loss gradient (inference, or checking the routed path alone).
    pub fn zero() -> Self {
        RouterLossScale { aux: 0.0, z: 0.0 }
    }
}

/// `1 / (grad_accum · num_chunks)`: the one place this factor is computed.
pub fn micro_batch_factor(grad_accum: usize, num_chunks: usize) -> Result<f64> {
    if grad_accum == 0 {
        return Err(Error::Config {
            field: "grad_accum",
            value: "0".into(),
            rule: "must be >= 1",
        });
    }
    if num_chunks == 0 {
        return Err(Error::Config {
            field: "num_chunks",
            value: "0".into(),
            rule: "must be >= 1",
        });
    }
    Ok(1.0 / (grad_accum as f64 * num_chunks as f64))
}

/// Router loss of one optimizer step, accumulated over its micro-batches (and pipeline
/// chunks), each scaled by 1/(grad_accum · num_chunks) exactly once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRouterLoss {
    weights: RouterLossWeights,
    factor: f64,
    total: f64,
    added: usize,
}

impl StepRouterLoss {
    /// An empty step.
    pub fn new(weights: RouterLossWeights, grad_accum: usize, num_chunks: usize) -> Result<Self> {
        Ok(StepRouterLoss {
            weights,
            factor: micro_batch_factor(grad_accum, num_chunks)?,
            total: 0.0,
            added: 0,
        })
    }

    /// Adds one micro-batch's (one chunk's) layer losses.
    pub fn add_micro_batch(&mut self, layers: &[LayerRouterLosses]) {
        self.total += collect_router_losses(layers, self.weights) * self.factor;
        self.added += 1;
    }

    /// The step's router loss so far.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// Micro-batches (chunks) added.
    pub fn micro_batches(&self) -> usize {
        self.added
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use megamoe_tensor::Device;

    #[test]
    fn z_loss_of_zero_logits_is_ln_e_squared() {
        let z = Tensor::zeros([5, 8], DType::F32, Device::Cpu).unwrap();
        let (l, _) = z_loss_forward(&z).unwrap();
        let want = (8f64).ln().powi(2);
        assert!((l.to_scalar_f32().unwrap() as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn aux_loss_uniform_routing_is_one_collapse_is_e() {
        // 4 tokens, E=4, k=1; zero logits → P_i = 1/4.
        let z = Tensor::zeros([4, 4], DType::F32, Device::Cpu).unwrap();
        // uniform: token t → expert t: f_i = 1/4, aux = 4 · Σ 1/4·1/4 = 1.
        let uni = Tensor::from_vec_i32(vec![0, 1, 2, 3], [4, 1], Device::Cpu).unwrap();
        let (a, _) = aux_loss_forward(AuxLossKind::Aux, ScoreFn::Softmax, &z, &uni, 4).unwrap();
        assert!((a.to_scalar_f32().unwrap() - 1.0).abs() < 1e-6);
        // collapse with confident router: logits +20 on expert 0 → P_0 ≈ 1, f_0 = 1 → aux ≈ 4.
        let mut zc = vec![0.0f32; 16];
        for t in 0..4 {
            zc[t * 4] = 20.0;
        }
        let zc = Tensor::from_vec_f32(zc, [4, 4], Device::Cpu).unwrap();
        let col = Tensor::from_vec_i32(vec![0, 0, 0, 0], [4, 1], Device::Cpu).unwrap();
        let (a, _) = aux_loss_forward(AuxLossKind::Aux, ScoreFn::Softmax, &zc, &col, 4).unwrap();
        assert!((a.to_scalar_f32().unwrap() - 4.0).abs() < 1e-5);
        let (a, s) = aux_loss_forward(AuxLossKind::None, ScoreFn::Softmax, &zc, &col, 4).unwrap();
        assert_eq!(a.to_scalar_f32().unwrap(), 0.0);
        assert!(s.is_none());
    }

    #[test]
    fn loss_collection_seed_defaults_and_empty() {
        let w = RouterLossWeights::default();
        assert_eq!((w.aux, w.z), (0.01, 1e-3));
        assert_eq!(collect_router_losses(&[], w), 0.0);
        let layers = [
            LayerRouterLosses { aux: 1.5, z: 4.0 },
            LayerRouterLosses { aux: 0.5, z: 2.0 },
        ];
        // 0.01·1.5 + 1e-3·4 + 0.01·0.5 + 1e-3·2 = 0.015 + 0.004 + 0.005 + 0.002 = 0.026
        assert!((collect_router_losses(&layers, w) - 0.026).abs() < 1e-15);
    }

    #[test]
    fn step_loss_scales_once_per_micro_batch() {
        // grad_accum 4, 2 chunks: 8 equal micro-batch adds give the single value back.
        let w = RouterLossWeights::default();
        let layers = [LayerRouterLosses { aux: 1.0, z: 10.0 }];
        let mut step = StepRouterLoss::new(w, 4, 2).unwrap();
        for _ in 0..8 {
            step.add_micro_batch(&layers);
        }
        assert!((step.total() - 0.02).abs() < 1e-15); // 0.01·1 + 1e-3·10
        let s = RouterLossScale::new(w, 4, 2).unwrap();
        assert!((s.aux as f64 - 0.01 / 8.0).abs() < 1e-9); // f32 rounding of 1.25e-3
        assert!(RouterLossScale::new(w, 0, 1).is_err());
        assert!(StepRouterLoss::new(w, 1, 0).is_err());
    }
}
