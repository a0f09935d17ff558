//! The routed expert bank: one FFN per expert over its rows of the permuted tokens
//! (spec "Expert bank"; seed `fused_expert_bank_probe_sample.py`; Megatron `experts.py`).
//!
//! Rows `x [R, H]` are grouped by expert ([`RowGroups`]: expert `e` owns `sizes[e]` rows from
//! row `offsets[e]`, as device tensors; zeros legal: an empty expert does no work and gets
//! zero weight gradients; rows outside every group, e.g. the pad rows of static-capacity
//! buffers, are not computed and come out zero). Per expert `e`:
//! - swiglu: `y = (silu(x W_gateᵀ) ⊙ (x W_upᵀ)) W_downᵀ`
//! - relu2:  `y = relu(x W_upᵀ)² W_downᵀ`
//! - gelu:   `y = gelu_erf(x W_upᵀ) W_downᵀ`
//!
//! with `W_gate, W_up [E, F, H]` and `W_down [E, H, F]` (PyTorch Linear layout stacked on
//! dim 0). [`GroupedExperts`] runs each matrix product as one grouped GEMM over all experts;
//! [`SequentialExperts`] loops over experts with dense GEMMs — the readable reference the
//! grouped path is tested against ([`compare_expert_banks`]).
//!
//! Forward saves the rows and pre-activations; `backward_input` returns `d_x` (written
//! fresh) and the deferred W work; `backward_weight` accumulates (+=) dW.

use megamoe_plan::Activation;
use megamoe_tensor::{RowGroups, Tensor};

use crate::config::RoutedExpertsConfig;
use crate::error::{check_shape, shape_str, Error, Result};

/// Stacked expert weights (also used for their gradients).
#[derive(Debug, Clone)]
pub struct RoutedExpertsParams {
    /// W_gate `[E, F, H]`; `Some` iff swiglu.
    pub gate_proj: Option<Tensor>,
    /// W_up `[E, F, H]` (the fc matrix for relu2/gelu).
    pub up_proj: Tensor,
    /// W_down `[E, H, F]`.
    pub down_proj: Tensor,
}

/// What an expert bank's `backward_input` needs.
#[derive(Debug, Clone)]
pub struct ExpertsSaved {
    x: Tensor,
    groups: RowGroups,
    h_gate: Option<Tensor>,
    h_up: Tensor,
    act: Tensor,
}

/// What an expert bank's `backward_weight` needs.
#[derive(Debug, Clone)]
pub struct ExpertsDeferredW {
    x: Tensor,
    groups: RowGroups,
    act: Tensor,
    d_out: Tensor,
    d_h_gate: Option<Tensor>,
    d_h_up: Tensor,
}

/// Forward / split backward of a bank of experts over grouped rows.
pub trait ExpertBank {
    /// `x [R, H]` grouped by `groups` → `y [R, H]` (zero outside the groups).
    fn forward(
        &self,
        p: &RoutedExpertsParams,
        x: &Tensor,
        groups: &RowGroups,
    ) -> Result<(Tensor, ExpertsSaved)>;
    /// `d_y [R, H]` → `d_x [R, H]` (written fresh) and the deferred W work.
    fn backward_input(
        &self,
        p: &RoutedExpertsParams,
        d_y: &Tensor,
        saved: ExpertsSaved,
    ) -> Result<(Tensor, ExpertsDeferredW)>;
    /// Accumulates (+=) dW_gate, dW_up, dW_down into `grads`.
    fn backward_weight(&self, w: ExpertsDeferredW, grads: &mut RoutedExpertsParams) -> Result<()>;
}

/// Checks weight shapes against the config.
pub fn check_expert_params(cfg: &RoutedExpertsConfig, p: &RoutedExpertsParams) -> Result<()> {
    let (e, h, f) = (cfg.num_routed_experts, cfg.d_model, cfg.hidden);
    match (&p.gate_proj, cfg.activation) {
        (Some(g), Activation::SwiGlu) => check_shape("experts.gate_proj", g, &[e, f, h])?,
        (None, Activation::SwiGlu) => {
            return Err(Error::MissingTensor {
                name: "experts.gate_proj".into(),
                expected: shape_str(&[e, f, h]),
            })
        }
        (Some(g), _) => {
            return Err(Error::ParamShape {
                what: "experts.gate_proj (only swiglu has one)",
                expected: vec![],
                got: g.dims().to_vec(),
            })
        }
        (None, _) => {}
    }
    check_shape("experts.up_proj", &p.up_proj, &[e, f, h])?;
    check_shape("experts.down_proj", &p.down_proj, &[e, h, f])
}

/// Activation forward on pre-activations: (`h_gate` for swiglu, `h_up`) → act.
fn activate(act: Activation, h_gate: Option<&Tensor>, h_up: &Tensor) -> Result<Tensor> {
    Ok(match (act, h_gate) {
        (Activation::SwiGlu, Some(g)) => g.swiglu(h_up)?,
        (Activation::Relu2, _) => h_up.relu2()?,
        (Activation::Gelu, _) => h_up.gelu()?,
        (Activation::SwiGlu, None) => {
            return Err(Error::MissingTensor {
                name: "experts.gate_proj".into(),
                expected: shape_str(&[]),
            })
        }
    })
}

/// Activation backward: d_act → (d_h_gate, d_h_up).
fn activate_backward(
    act: Activation,
    h_gate: Option<&Tensor>,
    h_up: &Tensor,
    d_act: &Tensor,
) -> Result<(Option<Tensor>, Tensor)> {
    Ok(match (act, h_gate) {
        (Activation::SwiGlu, Some(g)) => {
            let (dg, du) = Tensor::swiglu_backward(g, h_up, d_act)?;
            (Some(dg), du)
        }
        (Activation::Relu2, _) => (None, h_up.relu2_backward(d_act)?),
        (Activation::Gelu, _) => (None, h_up.gelu_backward(d_act)?),
        (Activation::SwiGlu, None) => {
            return Err(Error::MissingTensor {
                name: "experts.gate_proj".into(),
                expected: shape_str(&[]),
            })
        }
    })
}

/// The fast path: one grouped GEMM per matrix over all experts.
#[derive(Debug, Clone, Copy)]
pub struct GroupedExperts {
    /// Bank shape and activation.
    pub cfg: RoutedExpertsConfig,
}

impl ExpertBank for GroupedExperts {
    fn forward(
        &self,
        p: &RoutedExpertsParams,
        x: &Tensor,
        groups: &RowGroups,
    ) -> Result<(Tensor, ExpertsSaved)> {
        let h_gate = match &p.gate_proj {
            Some(w) => Some(x.grouped_matmul(groups, w, true)?),
            None => None,
        };
        let h_up = x.grouped_matmul(groups, &p.up_proj, true)?;
        let act = activate(self.cfg.activation, h_gate.as_ref(), &h_up)?;
        let y = act.grouped_matmul(groups, &p.down_proj, true)?;
        Ok((
            y,
            ExpertsSaved {
                x: x.clone(),
                groups: groups.clone(),
                h_gate,
                h_up,
                act,
            },
        ))
    }

    fn backward_input(
        &self,
        p: &RoutedExpertsParams,
        d_y: &Tensor,
        s: ExpertsSaved,
    ) -> Result<(Tensor, ExpertsDeferredW)> {
        let gs = &s.groups;
        let d_act = d_y.grouped_matmul(gs, &p.down_proj, false)?;
        let (d_h_gate, d_h_up) =
            activate_backward(self.cfg.activation, s.h_gate.as_ref(), &s.h_up, &d_act)?;
        let mut d_x = d_h_up.grouped_matmul(gs, &p.up_proj, false)?;
        if let (Some(dg), Some(wg)) = (&d_h_gate, &p.gate_proj) {
            // d_x += d_gate · W_gate, accumulated by the GEMM itself (no temporary).
            d_x.grouped_matmul_acc(dg, gs, wg, false, 1.0)?;
        }
        Ok((
            d_x,
            ExpertsDeferredW {
                x: s.x,
                groups: s.groups,
                act: s.act,
                d_out: d_y.clone(),
                d_h_gate,
                d_h_up,
            },
        ))
    }

    fn backward_weight(&self, w: ExpertsDeferredW, g: &mut RoutedExpertsParams) -> Result<()> {
        // dW += dy_gᵀ x_g straight into the gradient buffers (gemm's beta = 1).
        let gs = &w.groups;
        g.down_proj
            .grouped_matmul_wgrad_acc(&w.d_out, &w.act, gs, 1.0)?;
        g.up_proj
            .grouped_matmul_wgrad_acc(&w.d_h_up, &w.x, gs, 1.0)?;
        if let (Some(dg), Some(gg)) = (&w.d_h_gate, g.gate_proj.as_mut()) {
            gg.grouped_matmul_wgrad_acc(dg, &w.x, gs, 1.0)?;
        }
        Ok(())
    }
}

/// The reference: a loop over experts, each a dense FFN on its own rows.
#[derive(Debug, Clone, Copy)]
pub struct SequentialExperts {
    /// Bank shape and activation.
    pub cfg: RoutedExpertsConfig,
}

/// Expert `e`'s matrix `[out, in]` of a stack `[E, out, in]`.
fn expert_matrix(w: &Tensor, e: usize) -> Result<Tensor> {
    let (_, o, i) = w.dims3()?;
    Ok(w.narrow(0, e, 1)?.reshape([o, i])?)
}

/// The groups as host `(first row, rows)` spans, one per expert.
fn host_spans(groups: &RowGroups) -> Result<Vec<(usize, usize)>> {
    // SYNC: the sequential reference (tests) reads the group layout; the grouped path never.
    let sizes = groups.sizes().to_host_i32()?;
    let offsets = groups.offsets().to_host_i32()?;
    Ok(offsets
        .iter()
        .zip(&sizes)
        .map(|(&o, &n)| (o as usize, n as usize))
        .collect())
}

/// `[rows, width]` with `blocks[e]` (`[len_e, width]`) at `spans[e]` and zeros elsewhere.
fn assemble(
    blocks: &[Tensor],
    spans: &[(usize, usize)],
    rows: usize,
    width: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let zeros = |n: usize| Tensor::zeros([n, width], megamoe_tensor::DType::F32, like.device());
    let mut parts = Vec::with_capacity(2 * blocks.len() + 1);
    let mut cursor = 0;
    for (b, &(start, n)) in blocks.iter().zip(spans) {
        if start > cursor {
            parts.push(zeros(start - cursor)?);
        }
        parts.push(b.clone());
        cursor = start + n;
    }
    if rows > cursor || parts.is_empty() {
        parts.push(zeros(rows - cursor)?);
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok(Tensor::cat(&refs, 0)?)
}

impl ExpertBank for SequentialExperts {
    fn forward(
        &self,
        p: &RoutedExpertsParams,
        x: &Tensor,
        groups: &RowGroups,
    ) -> Result<(Tensor, ExpertsSaved)> {
        let (rows, f) = (x.dim(0)?, self.cfg.hidden);
        let spans = host_spans(groups)?;
        let (mut gates, mut ups, mut acts, mut ys) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (e, &(start, n)) in spans.iter().enumerate() {
            let xe = x.narrow(0, start, n)?;
            let hg = match &p.gate_proj {
                Some(w) => Some(xe.matmul(&expert_matrix(w, e)?, false, true)?),
                None => None,
            };
            let hu = xe.matmul(&expert_matrix(&p.up_proj, e)?, false, true)?;
            let a = activate(self.cfg.activation, hg.as_ref(), &hu)?;
            ys.push(a.matmul(&expert_matrix(&p.down_proj, e)?, false, true)?);
            gates.extend(hg);
            ups.push(hu);
            acts.push(a);
        }
        let h_gate = match p.gate_proj {
            Some(_) => Some(assemble(&gates, &spans, rows, f, x)?),
            None => None,
        };
        Ok((
            assemble(&ys, &spans, rows, self.cfg.d_model, x)?,
            ExpertsSaved {
                x: x.clone(),
                groups: groups.clone(),
                h_gate,
                h_up: assemble(&ups, &spans, rows, f, x)?,
                act: assemble(&acts, &spans, rows, f, x)?,
            },
        ))
    }

    fn backward_input(
        &self,
        p: &RoutedExpertsParams,
        d_y: &Tensor,
        s: ExpertsSaved,
    ) -> Result<(Tensor, ExpertsDeferredW)> {
        let (rows, h) = d_y.dims2()?;
        let f = self.cfg.hidden;
        let spans = host_spans(&s.groups)?;
        let (mut d_xs, mut d_gs, mut d_us) = (Vec::new(), Vec::new(), Vec::new());
        for (e, &(start, n)) in spans.iter().enumerate() {
            let dye = d_y.narrow(0, start, n)?;
            let d_act = dye.matmul(&expert_matrix(&p.down_proj, e)?, false, false)?;
            let hg = match &s.h_gate {
                Some(t) => Some(t.narrow(0, start, n)?),
                None => None,
            };
            let hu = s.h_up.narrow(0, start, n)?;
            let (dg, du) = activate_backward(self.cfg.activation, hg.as_ref(), &hu, &d_act)?;
            let mut dx = du.matmul(&expert_matrix(&p.up_proj, e)?, false, false)?;
            if let (Some(dg), Some(wg)) = (&dg, &p.gate_proj) {
                dx.add_assign(&dg.matmul(&expert_matrix(wg, e)?, false, false)?)?;
                d_gs.push(dg.clone());
            }
            d_xs.push(dx);
            d_us.push(du);
        }
        let d_h_gate = match s.h_gate {
            Some(_) => Some(assemble(&d_gs, &spans, rows, f, d_y)?),
            None => None,
        };
        Ok((
            assemble(&d_xs, &spans, rows, h, d_y)?,
            ExpertsDeferredW {
                x: s.x,
                act: s.act,
                d_out: d_y.clone(),
                d_h_gate,
                d_h_up: assemble(&d_us, &spans, rows, f, d_y)?,
                groups: s.groups,
            },
        ))
    }

    fn backward_weight(&self, w: ExpertsDeferredW, g: &mut RoutedExpertsParams) -> Result<()> {
        let (h, f) = (self.cfg.d_model, self.cfg.hidden);
        let spans = host_spans(&w.groups)?;
        let mut d_down = Vec::new();
        let mut d_up = Vec::new();
        let mut d_gate = Vec::new();
        for &(start, n) in &spans {
            let dy = w.d_out.narrow(0, start, n)?;
            d_down.push(
                dy.matmul(&w.act.narrow(0, start, n)?, true, false)?
                    .reshape([1, h, f])?,
            );
            let x = w.x.narrow(0, start, n)?;
            d_up.push(
                w.d_h_up
                    .narrow(0, start, n)?
                    .matmul(&x, true, false)?
                    .reshape([1, f, h])?,
            );
            if let Some(dg) = &w.d_h_gate {
                d_gate.push(
                    dg.narrow(0, start, n)?
                        .matmul(&x, true, false)?
                        .reshape([1, f, h])?,
                );
            }
        }
        debug_assert_eq!(d_down.len(), self.cfg.num_routed_experts);
        let stack = |v: &[Tensor]| -> Result<Tensor> {
            let refs: Vec<&Tensor> = v.iter().collect();
            Ok(Tensor::cat(&refs, 0)?)
        };
        g.down_proj.add_assign(&stack(&d_down)?)?;
        g.up_proj.add_assign(&stack(&d_up)?)?;
        if let Some(gg) = g.gate_proj.as_mut() {
            gg.add_assign(&stack(&d_gate)?)?;
        }
        Ok(())
    }
}

/// Largest |grouped − sequential| over the outputs, d_x and every weight gradient, relative
/// to the largest |sequential| of that tensor: the `SequentialExperts` vs `GroupedExperts`
/// tester (STYLE 2.9). Both banks run on identical inputs.
pub fn compare_expert_banks(
    cfg: RoutedExpertsConfig,
    p: &RoutedExpertsParams,
    x: &Tensor,
    group_sizes: &[usize],
    d_y: &Tensor,
) -> Result<f32> {
    let groups = RowGroups::from_sizes(group_sizes, x.device())?;
    let run = |bank: &dyn ExpertBank| -> Result<Vec<Tensor>> {
        let (y, s) = bank.forward(p, x, &groups)?;
        let (dx, w) = bank.backward_input(p, d_y, s)?;
        let mut g = zeros_like_experts(p)?;
        bank.backward_weight(w, &mut g)?;
        let mut out = vec![y, dx, g.up_proj, g.down_proj];
        out.extend(g.gate_proj);
        Ok(out)
    };
    let a = run(&GroupedExperts { cfg })?;
    let b = run(&SequentialExperts { cfg })?;
    let mut worst = 0.0f32;
    for (ta, tb) in a.iter().zip(&b) {
        let diff = ta.sub(tb)?.abs()?.max_last_dim_all()?;
        let scale = tb.abs()?.max_last_dim_all()?;
        // SYNC: a test helper, reads two scalars per tensor.
        let (d, s) = (diff.to_scalar_f32()?, scale.to_scalar_f32()?);
        worst = worst.max(if s > 0.0 { d / s } else { d });
    }
    Ok(worst)
}

/// Zero tensors shaped like `p` (a gradient accumulator).
pub fn zeros_like_experts(p: &RoutedExpertsParams) -> Result<RoutedExpertsParams> {
    Ok(RoutedExpertsParams {
        gate_proj: match &p.gate_proj {
            Some(t) => Some(zeros_like(t)?),
            None => None,
        },
        up_proj: zeros_like(&p.up_proj)?,
        down_proj: zeros_like(&p.down_proj)?,
    })
}

/// An f32 zero tensor with `t`'s shape and device.
pub(crate) fn zeros_like(t: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros(
        t.dims().to_vec(),
        megamoe_tensor::DType::F32,
        t.device(),
    )?)
}

/// Max over everything of a tensor reduced by `max_last_dim` until rank 0.
trait MaxAll {
    fn max_last_dim_all(&self) -> Result<Tensor>;
}

impl MaxAll for Tensor {
    fn max_last_dim_all(&self) -> Result<Tensor> {
        let n = self.numel();
        if n == 0 {
            return Ok(Tensor::scalar(0.0, self.device())?);
        }
        Ok(self.reshape([n])?.max_last_dim()?)
    }
}
