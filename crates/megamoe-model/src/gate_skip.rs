//! GateSkip: learned residual gates with a token budget (Thiggel/GateSkip, arXiv 2510.13876).
//!
//! One `skip_gate` per attention branch and per MLP/MoE branch. With the branch's normed
//! input `h [N, H]` (DETACHED: no gradient reaches `h` through the gate) and branch output
//! `f = f(h) [N, H]`:
//!
//! ```text
//! g = σ(h W_gᵀ + b_g)            vector gate W_g [H, H] → g [N, H]; scalar W_g [1, H] → g [N, 1]
//! s_t = mean_j g_{t,j}           token importance; padding tokens (target = ignore) get s = 1
//! skip_mask: per sequence, the ⌊p·T⌋ lowest-s tokens (ties: lower position first) are skipped
//! out = keep ⊙ g ⊙ f             a skipped token's branch output is exactly 0
//! x ← x + out                    skipped rows are copied bit-for-bit (the add only touches kept rows)
//! ```
//! Init (seed `gateskip_gate_init`): `W_g ~ N(0, 0.01²)`, `b_g = 5` (σ(5) ≈ 0.9933).
//! Budget `p` follows [`gate_skip_budget`]; layer 0 is never skipped (its gates still apply).
//! Sparsity penalty per gated module: `mean(g²)` (L2) or `mean(|g|)` (L1); the model averages
//! it over gated modules and weights it by λ_s.
//!
//! Backward (`d_out` the gradient of `out`): `d_f = keep ⊙ g ⊙ d_out`;
//! `d_g = keep ⊙ f ⊙ d_out (+ penalty)` (summed over channels for a scalar gate);
//! `d_pre = g(1−g) d_g`; `dW_g += d_preᵀ h`, `db_g += Σ_n d_pre` (accumulated).

use megamoe_optim::ParamRole;
use megamoe_plan::{GateKind, SkipPenalty};
use megamoe_tensor::{DType, Tensor};

use crate::error::{Error, Result};
use crate::init::Init;

/// Budget schedule (seed, exact): `budget(step) = (1−α)·start + α·end` with
/// `α = clamp(step, 0, warmup)/warmup`; `warmup ≤ 0` gives `end`. The budget is the share of
/// tokens skipped per gated module.
pub fn gate_skip_budget(step: i64, start: f64, end: f64, warmup: i64) -> f64 {
    if warmup <= 0 {
        return end;
    }
    let alpha = step.clamp(0, warmup) as f64 / warmup as f64;
    (1.0 - alpha) * start + alpha * end
}

/// One gate's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateSkipConfig {
    /// H.
    pub d_model: usize,
    /// Vector `[H, H]` or scalar `[1, H]` gate.
    pub gate: GateKind,
    /// L2 or L1 penalty.
    pub penalty: SkipPenalty,
    /// `b_g` init.
    pub init_bias: f32,
    /// `W_g` init std.
    pub init_std: f32,
}

impl GateSkipConfig {
    /// Gate width G: H (vector) or 1 (scalar).
    pub fn width(&self) -> usize {
        match self.gate {
            GateKind::Vector => self.d_model,
            GateKind::Scalar => 1,
        }
    }
}

/// One gate's weights.
#[derive(Debug, Clone)]
pub struct SkipGateParams {
    /// `W_g [G, H]`.
    pub weight: Tensor,
    /// `b_g [G]`.
    pub bias: Tensor,
}

impl SkipGateParams {
    /// `W_g ~ N(0, init_std²)` named `{prefix}.weight`, `b_g = init_bias`.
    pub fn init(c: &GateSkipConfig, init: &Init, prefix: &str) -> Result<Self> {
        Ok(SkipGateParams {
            weight: init.randn(
                &format!("{prefix}.weight"),
                &[c.width(), c.d_model],
                c.init_std,
            )?,
            bias: init.full(&[c.width()], c.init_bias)?,
        })
    }

    /// `{prefix}.weight` ([`ParamRole::Gate`]) and `{prefix}.bias` ([`ParamRole::Bias`]).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        f(&format!("{prefix}.weight"), &self.weight, ParamRole::Gate);
        f(&format!("{prefix}.bias"), &self.bias, ParamRole::Bias);
    }

    /// Mutable twin of [`SkipGateParams::visit`].
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        f(
            &format!("{prefix}.weight"),
            &mut self.weight,
            ParamRole::Gate,
        );
        f(&format!("{prefix}.bias"), &mut self.bias, ParamRole::Bias);
    }
}

/// Token layout and budget of one gated call.
#[derive(Debug, Clone, Copy)]
pub struct SkipCx<'a> {
    /// B sequences.
    pub b: usize,
    /// T tokens per sequence.
    pub t: usize,
    /// Skip share p (0 = no skipping; layer 0 always passes 0).
    pub budget: f64,
    /// `[N]` 1 for padding tokens (importance forced to 1, never skipped).
    pub never_skip: Option<&'a Tensor>,
}

/// Which tokens of a module are skipped.
#[derive(Debug, Clone)]
pub struct SkipMask {
    /// `[N]`: 1 = kept, 0 = skipped.
    pub keep: Tensor,
    /// Global rows of kept tokens `[N_kept]` (i32, ascending within each sequence).
    pub kept_rows: Tensor,
    /// Skipped tokens per sequence, ⌊p·T⌋.
    pub skipped_per_seq: usize,
}

/// What the gate's backward needs.
#[derive(Debug)]
pub struct SkipGateSaved {
    h: Tensor,
    g: Tensor,
    f: Tensor,
    mask: Option<SkipMask>,
}

/// What the gate's weight gradient needs.
#[derive(Debug)]
pub struct SkipGateDeferredW {
    h: Tensor,
    d_pre: Tensor,
}

/// Forward results of one gated branch.
#[derive(Debug)]
pub struct GatedBranch {
    /// `keep ⊙ g ⊙ f [N, H]` (rows of skipped tokens are 0).
    pub out: Tensor,
    /// The skip mask; `None` when nothing is skipped.
    pub mask: Option<SkipMask>,
    /// Unweighted penalty of this module (rank 0).
    pub penalty: Tensor,
    /// Mean gate value (rank 0).
    pub mean_gate: Tensor,
}

/// A GateSkip gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SkipGate {
    /// Settings.
    pub cfg: GateSkipConfig,
}

impl SkipGate {
    /// Importance-based skip mask: `s [N]` of `b` sequences of length `t`; skips the
    /// ⌊budget·t⌋ lowest-s tokens of each sequence (ties: lower position first). `None` when
    /// that count is 0.
    pub fn skip_mask(s: &Tensor, b: usize, t: usize, budget: f64) -> Result<Option<SkipMask>> {
        if !(0.0..1.0).contains(&budget) {
            return Err(Error::Config {
                field: "gateskip budget",
                value: budget.to_string(),
                rule: "must be a share in [0, 1)",
            });
        }
        let n_skip = (budget * t as f64).floor() as usize;
        if n_skip == 0 {
            return Ok(None);
        }
        let n_keep = t - n_skip;
        // topk of −s over the whole row sorts ascending by s, ties to the lower position.
        let (_, order) = s.reshape([b, t])?.neg()?.topk(t)?;
        let kept_local = order.narrow(1, n_skip, n_keep)?;
        // Local → global row: + b·T (i32 values < 2^24 are exact in f32).
        let offsets: Vec<f32> = (0..b)
            .flat_map(|i| std::iter::repeat_n((i * t) as f32, n_keep))
            .collect();
        let offsets = Tensor::from_vec_f32(offsets, [b, n_keep], s.device())?;
        let kept_rows = kept_local
            .to_dtype(DType::F32)?
            .add(&offsets)?
            .to_dtype(DType::I32)?
            .reshape([b * n_keep])?;
        let ones = Tensor::ones([b * n_keep, 1], DType::F32, s.device())?;
        let keep = Tensor::zeros([b * t, 1], DType::F32, s.device())?
            .index_add_rows(&kept_rows, &ones, None)?
            .reshape([b * t])?;
        Ok(Some(SkipMask {
            keep,
            kept_rows,
            skipped_per_seq: n_skip,
        }))
    }

    /// Gate values `g = σ(h W_gᵀ + b_g)` `[N, G]` for the (detached) branch input `h`.
    pub fn gate(&self, p: &SkipGateParams, h: &Tensor) -> Result<Tensor> {
        Ok(h.matmul(&p.weight, false, true)?
            .add_row(&p.bias)?
            .sigmoid()?)
    }

    /// Gates branch output `f [N, H]` computed from input `h [N, H]`.
    pub fn forward(
        &self,
        p: &SkipGateParams,
        h: &Tensor,
        f: Tensor,
        cx: &SkipCx<'_>,
    ) -> Result<(GatedBranch, SkipGateSaved)> {
        let SkipCx {
            b,
            t,
            budget,
            never_skip,
        } = *cx;
        let g = self.gate(p, h)?;
        let gated = self.apply(&f, &g)?;
        let mask = if budget > 0.0 {
            let mut s = g.mean_last_dim()?;
            if let Some(pad) = never_skip {
                // s ← s ⊙ (1 − pad) + pad
                s = s.sub(&s.mul(pad)?)?.add(pad)?;
            }
            Self::skip_mask(&s, b, t, budget)?
        } else {
            None
        };
        let out = match &mask {
            Some(m) => gated.mul_col(&m.keep)?,
            None => gated,
        };
        let penalty = match self.cfg.penalty {
            SkipPenalty::L2 => g.square()?.mean_all()?,
            SkipPenalty::L1 => g.abs()?.mean_all()?,
        };
        let mean_gate = g.mean_all()?;
        Ok((
            GatedBranch {
                out,
                mask: mask.clone(),
                penalty,
                mean_gate,
            },
            SkipGateSaved {
                h: h.clone(),
                g,
                f,
                mask,
            },
        ))
    }

    /// `g ⊙ f` (vector) or `g[n] · f[n, :]` (scalar).
    fn apply(&self, f: &Tensor, g: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.gate {
            GateKind::Vector => f.mul(g)?,
            GateKind::Scalar => f.mul_col(&g.reshape([g.dims()[0]])?)?,
        })
    }

    /// `d_out [N, H]` → `d_f [N, H]` (fresh). `penalty_scale` is d(total loss)/d(this
    /// module's penalty) (λ_s / n_modules × the step's gradient scale).
    pub fn backward_input(
        &self,
        d_out: &Tensor,
        s: SkipGateSaved,
        penalty_scale: f32,
    ) -> Result<(Tensor, SkipGateDeferredW)> {
        let d_out = match &s.mask {
            Some(m) => d_out.mul_col(&m.keep)?,
            None => d_out.clone(),
        };
        let d_f = self.apply(&d_out, &s.g)?;
        let mut d_g = match self.cfg.gate {
            GateKind::Vector => d_out.mul(&s.f)?,
            GateKind::Scalar => {
                let n = s.g.dims()[0];
                d_out.mul(&s.f)?.sum_last_dim()?.reshape([n, 1])?
            }
        };
        if penalty_scale != 0.0 {
            let numel = s.g.numel() as f32;
            // d mean(g²)/dg = 2g/numel;  d mean(|g|)/dg = 1/numel (g = σ(·) > 0).
            let d_pen = match self.cfg.penalty {
                SkipPenalty::L2 => s.g.scale(2.0 * penalty_scale / numel)?,
                SkipPenalty::L1 => s.g.affine(0.0, penalty_scale / numel)?,
            };
            d_g.add_assign(&d_pen)?;
        }
        let d_pre = s.g.sigmoid_backward(&d_g)?;
        Ok((d_f, SkipGateDeferredW { h: s.h, d_pre }))
    }

    /// Accumulates (+=) `dW_g`, `db_g`.
    pub fn backward_weight(&self, w: SkipGateDeferredW, g: &mut SkipGateParams) -> Result<()> {
        g.weight.matmul_acc(&w.d_pre, &w.h, true, false, 1.0)?;
        g.bias.add_assign(&w.d_pre.sum_rows()?)?;
        Ok(())
    }
}

/// `x + out` with rows outside `mask.kept_rows` copied bit-for-bit from `x`.
pub fn residual_add(x: &Tensor, out: &Tensor, mask: Option<&SkipMask>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => x.index_add_rows(&m.kept_rows, &out.index_select(&m.kept_rows)?, None)?,
        None => x.add(out)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check, randn, Probe};
    use megamoe_tensor::Device;

    #[test]
    fn budget_schedule_follows_seed_formula() {
        // budget = (1−α)·start + α·end, α = clamp(step,0,warmup)/warmup; by hand:
        assert_eq!(gate_skip_budget(0, 0.0, 0.5, 100), 0.0);
        assert!((gate_skip_budget(50, 0.0, 0.5, 100) - 0.25).abs() < 1e-12);
        assert!((gate_skip_budget(25, 0.1, 0.3, 100) - 0.15).abs() < 1e-12); // .75·.1+.25·.3
        assert_eq!(gate_skip_budget(1000, 0.1, 0.3, 100), 0.3); // clamped at warmup
        assert_eq!(gate_skip_budget(-7, 0.1, 0.3, 100), 0.1); // clamped at 0
        assert_eq!(gate_skip_budget(10, 0.1, 0.3, 0), 0.3); // warmup ≤ 0 → end
        assert_eq!(gate_skip_budget(10, 0.1, 0.3, -5), 0.3);
    }

    #[test]
    fn skip_mask_drops_lowest_importance_with_ties_to_lower_position() {
        // Two sequences of 4; budget 0.5 → ⌊0.5·4⌋ = 2 skipped per sequence.
        let s = Tensor::from_vec_f32(
            vec![0.9, 0.1, 0.5, 0.2, 0.3, 0.3, 0.3, 0.8],
            [8],
            Device::Cpu,
        )
        .unwrap();
        let m = SkipGate::skip_mask(&s, 2, 4, 0.5).unwrap().unwrap();
        // seq 0 skips positions 1 (0.1) and 3 (0.2); seq 1: three ties at 0.3 → skip 4, 5.
        assert_eq!(
            m.keep.to_host_f32().unwrap(),
            vec![1., 0., 1., 0., 0., 0., 1., 1.]
        );
        assert_eq!(m.skipped_per_seq, 2);
        let mut kept = m.kept_rows.to_host_i32().unwrap();
        kept.sort();
        assert_eq!(kept, vec![0, 2, 6, 7]);
        assert!(SkipGate::skip_mask(&s, 2, 4, 0.2).unwrap().is_none()); // ⌊0.8⌋ = 0
        assert!(SkipGate::skip_mask(&s, 2, 4, 1.0).is_err());
    }

    fn gate(kind: GateKind, penalty: SkipPenalty) -> (SkipGate, SkipGateParams) {
        let cfg = GateSkipConfig {
            d_model: 6,
            gate: kind,
            penalty,
            init_bias: 0.3,
            init_std: 0.5,
        };
        (
            SkipGate { cfg },
            SkipGateParams::init(&cfg, &Init::new(1), "g").unwrap(),
        )
    }

    #[test]
    fn init_matches_seed_gate_init() {
        let cfg = GateSkipConfig {
            d_model: 64,
            gate: GateKind::Vector,
            penalty: SkipPenalty::L2,
            init_bias: 5.0,
            init_std: 0.01,
        };
        let p = SkipGateParams::init(&cfg, &Init::new(1), "g").unwrap();
        assert!(p.bias.to_host_f32().unwrap().iter().all(|&b| b == 5.0));
        let w = p.weight.to_host_f32().unwrap();
        let std = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.01).abs() < 0.001, "{std}");
        let g = SkipGate { cfg }.gate(&p, &randn(2, &[4, 64], 1.0)).unwrap();
        // σ(5 ± small) ≈ 0.9933: a near-transparent start.
        for v in g.to_host_f32().unwrap() {
            assert!((v - 0.9933).abs() < 0.01, "{v}");
        }
    }

    fn fd_case(kind: GateKind, penalty: SkipPenalty, budget: f64) {
        let (sg, p) = gate(kind, penalty);
        let h = randn(3, &[8, 6], 1.0);
        let f = randn(4, &[8, 6], 1.0);
        let probe = Probe::new(5, &[8, 6]);
        let pen_scale = 0.7f32;
        let cx = SkipCx {
            b: 2,
            t: 4,
            budget,
            never_skip: None,
        };
        // L = Σ r ⊙ out + pen_scale · penalty, as a function of f and the gate params.
        let loss = |p: &SkipGateParams, f: &Tensor| {
            let (o, _) = sg.forward(p, &h, f.clone(), &cx).unwrap();
            probe.loss(&o.out) + pen_scale as f64 * o.penalty.to_scalar_f32().unwrap() as f64
        };
        let (_, saved) = sg.forward(&p, &h, f.clone(), &cx).unwrap();
        let (d_f, w) = sg.backward_input(&probe.r, saved, pen_scale).unwrap();
        let mut g = p.clone();
        g.weight = Tensor::zeros(p.weight.dims().to_vec(), DType::F32, Device::Cpu).unwrap();
        g.bias = Tensor::zeros(p.bias.dims().to_vec(), DType::F32, Device::Cpu).unwrap();
        sg.backward_weight(w, &mut g).unwrap();
        check("d_f", &f, &d_f, |t| loss(&p, t));
        check("d_w", &p.weight, &g.weight, |t| {
            loss(
                &SkipGateParams {
                    weight: t.clone(),
                    bias: p.bias.clone(),
                },
                &f,
            )
        });
        check("d_b", &p.bias, &g.bias, |t| {
            loss(
                &SkipGateParams {
                    weight: p.weight.clone(),
                    bias: t.clone(),
                },
                &f,
            )
        });
    }

    #[test]
    fn vector_and_scalar_gate_backward_match_finite_differences() {
        fd_case(GateKind::Vector, SkipPenalty::L2, 0.0);
        fd_case(GateKind::Scalar, SkipPenalty::L1, 0.0);
        // With a budget the mask is piecewise constant; FD stays on one piece because the
        // importances differ by far more than the FD step moves them.
        fd_case(GateKind::Vector, SkipPenalty::L2, 0.25);
    }

    #[test]
    fn skipped_rows_are_bit_exact_residual_copies() {
        let (sg, p) = gate(GateKind::Vector, SkipPenalty::L2);
        let h = randn(3, &[8, 6], 1.0);
        let f = randn(4, &[8, 6], 1e6); // large branch output: any leak would show
        let x = randn(6, &[8, 6], 1e-3);
        let (o, _) = sg
            .forward(
                &p,
                &h,
                f,
                &SkipCx {
                    b: 2,
                    t: 4,
                    budget: 0.5,
                    never_skip: None,
                },
            )
            .unwrap();
        let m = o.mask.as_ref().unwrap();
        let y = residual_add(&x, &o.out, Some(m)).unwrap();
        let (xv, yv) = (x.to_host_f32().unwrap(), y.to_host_f32().unwrap());
        let keep = m.keep.to_host_f32().unwrap();
        assert_eq!(keep.iter().filter(|&&k| k == 0.0).count(), 4);
        for (n, &k) in keep.iter().enumerate() {
            let (xr, yr) = (&xv[n * 6..(n + 1) * 6], &yv[n * 6..(n + 1) * 6]);
            if k == 0.0 {
                assert!(xr.iter().zip(yr).all(|(a, b)| a.to_bits() == b.to_bits()));
            } else {
                assert!(xr != yr);
            }
        }
    }
}
