//! Shared experts: an always-on dense FFN over every token, with an optional learned
//! sigmoid gate (spec "Shared experts"; seed `shared_expert_gate_sample.py`; Qwen2-MoE).
//!
//! `n_s` shared experts are ONE FFN of width `Fs = n_s · shared_expert_hidden` with the
//! routed experts' activation (MOE_DECISIONS §10). With the gate:
//! `y_s = ffn(x) ⊙ σ(x · w_gᵀ)`, `w_g [1, H]`: one logit per token broadcast over H. A gate
//! weight of any other shape is an error (it would not broadcast over `[N, H]`).
//!
//! The FFN reuses the grouped expert bank with a single group (weights `[Fs, H]` viewed as
//! `[1, Fs, H]`, a free reshape), so routed and shared FFN math is one code path. The shared
//! weights stay split (`gate_proj`, `up_proj`): tensor parallelism slices their hidden units,
//! which in a fused `[2Fs, H]` weight would be two row ranges. With swiglu each call builds
//! the bank's fused `[1, 2Fs, H]` input projection (a copy of 2·Fs·H elements, against the
//! N·2Fs·H multiply-adds of its GEMM), and the fused weight gradient is added back into the
//! two halves.
//!
//! Backward: `d_ffn = d_y ⊙ σ`, `d_σ = Σ_H (d_y ⊙ ffn(x))`, `d_logit = d_σ · σ(1−σ)`,
//! `d_x += d_logit · w_g`, `dw_g += d_logitᵀ x`.

use megamoe_tensor::{DType, RowGroups, Tensor};

use crate::config::{RoutedExpertsConfig, SharedExpertsConfig};
use crate::error::{check_shape, shape_str, Error, Result};
use crate::experts::{
    ExpertBank, ExpertsDeferredW, ExpertsSaved, GroupedExperts, RoutedExpertsParams,
};
use crate::tp::TensorParallel;

/// Shared-expert weights (also used for their gradients).
#[derive(Debug, Clone)]
pub struct SharedExpertsParams {
    /// W_gate `[Fs, H]`; `Some` iff swiglu.
    pub gate_proj: Option<Tensor>,
    /// W_up `[Fs, H]`.
    pub up_proj: Tensor,
    /// W_down `[H, Fs]`.
    pub down_proj: Tensor,
    /// w_g `[1, H]` of the sigmoid gate; `Some` iff the gate is on.
    pub gate: Option<Tensor>,
}

/// What [`SharedExperts::backward_input`] needs.
#[derive(Debug, Clone)]
pub struct SharedExpertsSaved {
    x: Tensor,
    ffn: ExpertsSaved,
    /// `[N, H]` FFN output before the gate (only with the gate).
    ffn_out: Option<Tensor>,
    /// `[N]` σ(x · w_gᵀ) (only with the gate).
    sig: Option<Tensor>,
}

impl SharedExpertsSaved {
    /// Visits the shared FFN's pre-activations and activation (for offload).
    pub fn visit_intermediates(
        &mut self,
        f: &mut dyn FnMut(&mut Tensor) -> megamoe_tensor::Result<()>,
    ) -> megamoe_tensor::Result<()> {
        self.ffn.visit_activations(false, true, f)
    }

    /// Rank-0 mean over the tokens of the gate `σ(x · w_gᵀ)`; `None` without the gate.
    pub fn gate_mean(&self) -> Result<Option<Tensor>> {
        match &self.sig {
            Some(sig) => Ok(Some(sig.mean_all()?)),
            None => Ok(None),
        }
    }
}

/// What [`SharedExperts::backward_weight`] needs.
#[derive(Debug, Clone)]
pub struct SharedExpertsDeferredW {
    x: Tensor,
    ffn: ExpertsDeferredW,
    /// `[N, 1]` gradient of the gate logit.
    d_logit: Option<Tensor>,
}

/// The shared-expert path.
#[derive(Debug, Clone)]
pub struct SharedExperts {
    /// With tensor parallelism `hidden` is this rank's `Fs/tp`.
    cfg: SharedExpertsConfig,
    tp: Option<TensorParallel>,
}

/// `[out, in]` → `[1, out, in]` (free).
fn one(t: &Tensor) -> Result<Tensor> {
    let (o, i) = t.dims2()?;
    Ok(t.reshape([1, o, i])?)
}

impl SharedExperts {
    /// A shared path for `cfg`.
    pub fn new(cfg: SharedExpertsConfig) -> SharedExperts {
        SharedExperts { cfg, tp: None }
    }

    /// The path split over a tensor-parallel group: this rank holds hidden units
    /// `tp.slice(Fs)` (rows of `gate_proj` / `up_proj`, columns of `down_proj`); the FFN
    /// output is summed over the group before the gate, and so is its input gradient.
    /// The gate `w_g` stays whole (replicated).
    pub fn with_tensor_parallel(
        cfg: SharedExpertsConfig,
        tp: TensorParallel,
    ) -> Result<SharedExperts> {
        let local = tp.slice("moe.shared_expert_hidden × moe.shared_experts", cfg.hidden)?;
        Ok(SharedExperts {
            cfg: SharedExpertsConfig {
                hidden: local.len(),
                ..cfg
            },
            tp: Some(tp),
        })
    }

    /// Whether the path is split over a tensor-parallel group (its forward and backward
    /// are then collectives).
    pub fn is_tensor_parallel(&self) -> bool {
        self.tp.as_ref().is_some_and(|t| t.size() > 1)
    }

    /// `g` / `f'`: the group sum of a partial FFN output or input gradient.
    fn reduce(&self, partial: Tensor) -> Result<Tensor> {
        match &self.tp {
            Some(tp) => tp.reduce(&partial),
            None => Ok(partial),
        }
    }

    /// Its config.
    pub fn config(&self) -> &SharedExpertsConfig {
        &self.cfg
    }

    fn bank(&self) -> GroupedExperts {
        GroupedExperts {
            cfg: RoutedExpertsConfig {
                num_routed_experts: 1,
                d_model: self.cfg.d_model,
                hidden: self.cfg.hidden,
                activation: self.cfg.activation,
            },
        }
    }

    /// The bank's weights: `[1, 2Fs, H]` gate‖up (swiglu, a copy) or `[1, Fs, H]` up (a
    /// view), and `[1, H, Fs]` down (a view). The swiglu copy joins the two weights as the
    /// GEMM reads them ([`Tensor::as_gemm_weight`]: in bf16 mode their cached bf16
    /// copies, half the bytes of the f32 weights and no cast of the joined copy), the
    /// same bits as casting a joined f32 copy.
    fn bank_params(p: &SharedExpertsParams) -> Result<RoutedExpertsParams> {
        let in_proj = match &p.gate_proj {
            Some(g) => Tensor::cat(&[&g.as_gemm_weight()?, &p.up_proj.as_gemm_weight()?], 0)?,
            None => p.up_proj.clone(),
        };
        Ok(RoutedExpertsParams {
            in_proj: one(&in_proj)?,
            down_proj: one(&p.down_proj)?,
        })
    }

    /// Checks weight shapes (a gate that is not `[1, H]` is an error).
    pub fn check_params(&self, p: &SharedExpertsParams) -> Result<()> {
        let (h, f) = (self.cfg.d_model, self.cfg.hidden);
        let swiglu = self.cfg.activation == megamoe_plan::Activation::SwiGlu;
        match (&p.gate_proj, swiglu) {
            (Some(g), true) => check_shape("shared_experts.gate_proj", g, &[f, h])?,
            (None, true) => {
                return Err(Error::MissingTensor {
                    name: "shared_experts.gate_proj".into(),
                    expected: shape_str(&[f, h]),
                })
            }
            (Some(g), false) => {
                return Err(Error::ParamShape {
                    what: "shared_experts.gate_proj (only swiglu has one)",
                    expected: vec![],
                    got: g.dims().to_vec(),
                })
            }
            (None, false) => {}
        }
        check_shape("shared_experts.up_proj", &p.up_proj, &[f, h])?;
        check_shape("shared_experts.down_proj", &p.down_proj, &[h, f])?;
        match (&p.gate, self.cfg.gate) {
            (Some(g), true) => check_shape("shared_expert_gate.weight", g, &[1, h]),
            (None, false) => Ok(()),
            (None, true) => Err(Error::MissingTensor {
                name: "shared_expert_gate.weight".into(),
                expected: shape_str(&[1, h]),
            }),
            (Some(g), false) => Err(Error::ParamShape {
                what: "shared_expert_gate.weight (moe.shared_expert_gate is off)",
                expected: vec![],
                got: g.dims().to_vec(),
            }),
        }
    }

    /// `x [N, H]` → `y_s [N, H]`.
    pub fn forward(
        &self,
        p: &SharedExpertsParams,
        x: &Tensor,
    ) -> Result<(Tensor, SharedExpertsSaved)> {
        self.check_params(p)?;
        let n = x.dim(0)?;
        let all_rows = RowGroups::from_sizes(&[n], x.device())?;
        let (out, ffn) = self.bank().forward(&Self::bank_params(p)?, x, &all_rows)?;
        let out = self.reduce(out)?;
        match &p.gate {
            Some(wg) => {
                let sig = x.matmul(wg, false, true)?.sigmoid()?.reshape([n])?;
                let y = out.mul_col(&sig)?;
                Ok((
                    y,
                    SharedExpertsSaved {
                        x: x.clone(),
                        ffn,
                        ffn_out: Some(out),
                        sig: Some(sig),
                    },
                ))
            }
            None => Ok((
                out,
                SharedExpertsSaved {
                    x: x.clone(),
                    ffn,
                    ffn_out: None,
                    sig: None,
                },
            )),
        }
    }

    /// `d_y [N, H]` → `d_x += ∂L/∂x` (`d_x [N, H]`: the routed experts' input gradient,
    /// which this adds to) and the deferred W work. Without tensor parallelism and without
    /// the gate the FFN's last GEMM accumulates into `d_x` (beta 1: the sum is rounded
    /// once, no temporary and no add pass); otherwise the shared gradient is made whole
    /// (summed over the group, plus the gate term) and then added.
    pub fn backward_input_acc(
        &self,
        p: &SharedExpertsParams,
        d_y: &Tensor,
        s: SharedExpertsSaved,
        d_x: &mut Tensor,
    ) -> Result<SharedExpertsDeferredW> {
        let n = d_y.dim(0)?;
        let (d_ffn, d_logit) = match (&s.sig, &s.ffn_out) {
            (Some(sig), Some(out)) => {
                let d_sig = d_y.mul(out)?.sum_last_dim()?;
                let d_logit = sig.sigmoid_backward(&d_sig)?.reshape([n, 1])?;
                (d_y.mul_col(sig)?, Some(d_logit))
            }
            _ => (d_y.clone(), None),
        };
        let bank = Self::bank_params(p)?;
        let ffn = match (&self.tp, &d_logit) {
            (None, None) => self.bank().backward_input_acc(&bank, &d_ffn, s.ffn, d_x)?,
            _ => {
                // The group sum of the partial gradients, then the gate term, then the add:
                // a TP rank's partial is whole only after the sum, and a one-rank run of
                // such a layer keeps that order too (its layouts then differ from it only
                // by the split GEMM).
                let (d_part, ffn) = self.bank().backward_input(&bank, &d_ffn, s.ffn)?;
                let mut d_s = self.reduce(d_part)?;
                if let (Some(dl), Some(wg)) = (&d_logit, &p.gate) {
                    d_s.matmul_acc(dl, wg, false, false, 1.0)?;
                }
                *d_x = d_x.add(&d_s)?;
                ffn
            }
        };
        Ok(SharedExpertsDeferredW {
            x: s.x,
            ffn,
            d_logit,
        })
    }

    /// Accumulates (+=) the FFN and gate weight gradients into `grads`.
    pub fn backward_weight(
        &self,
        w: SharedExpertsDeferredW,
        grads: &mut SharedExpertsParams,
    ) -> Result<()> {
        // Accumulate into [1, ., .] views of the gradients. The fused gate‖up gradient of
        // swiglu goes straight into the two gradients when they lie one after the other in
        // one write-through buffer (a model's flat gradient buffer: one [1, 2Fs, H] view), else
        // into a temporary then added to its two halves (the same bits: the GEMM adds its
        // f32 product onto zeros there, onto the gradient here).
        let (in_proj, joined) = match &grads.gate_proj {
            Some(g) => {
                let (f, h) = g.dims2()?;
                // Only a write-through buffer is written in place by a view (another shared
                // buffer would be copied on write).
                match Tensor::joined(&[g, &grads.up_proj], [1, 2 * f, h]) {
                    Some(both) if both.is_write_through() => (both, true),
                    _ => (Tensor::zeros([1, 2 * f, h], DType::F32, g.device())?, false),
                }
            }
            None => (one(&grads.up_proj)?, true),
        };
        let mut g = RoutedExpertsParams {
            in_proj,
            down_proj: one(&grads.down_proj)?,
        };
        self.bank().backward_weight(w.ffn, &mut g)?;
        // Write the accumulated [1, ., .] views back as [., .].
        match grads.gate_proj.as_mut() {
            Some(_) if joined => {}
            Some(dst) => {
                let (f, h) = dst.dims2()?;
                dst.add_assign(&g.in_proj.narrow(1, 0, f)?.reshape([f, h])?)?;
                grads
                    .up_proj
                    .add_assign(&g.in_proj.narrow(1, f, f)?.reshape([f, h])?)?;
            }
            None => grads.up_proj = g.in_proj.reshape(grads.up_proj.dims().to_vec())?,
        }
        grads.down_proj = g.down_proj.reshape(grads.down_proj.dims().to_vec())?;
        if let (Some(dl), Some(gg)) = (&w.d_logit, grads.gate.as_mut()) {
            gg.matmul_acc(dl, &w.x, true, false, 1.0)?;
        }
        Ok(())
    }
}
