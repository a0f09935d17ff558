//! The routed expert bank: one FFN per expert over its rows of the permuted tokens
//! (spec "Expert bank"; seed `fused_expert_bank_probe_sample.py`; Megatron `experts.py`).
//!
//! Rows `x [R, H]` are grouped by expert ([`RowGroups`]: expert `e` owns `sizes[e]` rows from
//! row `offsets[e]`, as device tensors; zeros legal: an empty expert does no work and gets
//! zero weight gradients; rows outside every group, e.g. the pad rows of static-capacity
//! buffers, are not computed and come out zero). Per expert `e`:
//! - swiglu: `h = x W_gate_upᵀ [R, 2F]`, `y = (silu(h[:, ..F]) ⊙ h[:, F..]) W_downᵀ`
//! - relu2:  `y = relu(x W_upᵀ)² W_downᵀ`
//! - gelu:   `y = gelu_erf(x W_upᵀ) W_downᵀ`
//!
//! with `W_down [E, H, F]` and the input projection `W_in` (PyTorch Linear layout stacked on
//! dim 0): for swiglu the gate and up projections FUSED as one `W_gate_up [E, 2F, H]` (expert
//! `e`'s rows `0..F` are its `W_gate`, rows `F..2F` its `W_up`; name `experts.gate_up_proj`),
//! so the forward is one grouped GEMM for both (and so are `d_x` and the weight gradient),
//! and SwiGLU reads the two halves of each `[2F]` row in place
//! ([`Tensor::swiglu_gate_up`]); for relu2/gelu `W_up [E, F, H]` (`experts.up_proj`).
//! [`GroupedExperts`] runs each matrix product as one grouped GEMM over all experts;
//! [`SequentialExperts`] loops over experts with dense GEMMs — the readable reference the
//! grouped path is tested against ([`compare_expert_banks`]).
//!
//! Forward saves the rows and pre-activations; `backward_input` returns `d_x` (written
//! fresh) and the deferred W work; `backward_weight` accumulates (+=) dW.

use megamoe_plan::Activation;
use megamoe_tensor::{RowGroups, Tensor};

use crate::config::RoutedExpertsConfig;
use crate::error::{check_shape, Result};

/// Stacked expert weights (also used for their gradients).
#[derive(Debug, Clone)]
pub struct RoutedExpertsParams {
    /// The input projection `W_in`: swiglu `W_gate_up [E, 2F, H]` (per expert the gate rows,
    /// then the up rows), relu2/gelu `W_up [E, F, H]` (see the module docs).
    pub in_proj: Tensor,
    /// W_down `[E, H, F]`.
    pub down_proj: Tensor,
}

/// What an expert bank's `backward_input` needs.
#[derive(Debug, Clone)]
pub struct ExpertsSaved {
    x: Tensor,
    groups: RowGroups,
    /// Pre-activation `x W_inᵀ`: `[R, 2F]` (gate‖up) for swiglu, `[R, F]` otherwise.
    h: Tensor,
    act: Tensor,
}

impl ExpertsSaved {
    /// Visits the saved activations for offload, always in the same order: the input
    /// rows (`inputs`), then the pre-activations and the activation (`intermediates`).
    pub fn visit_activations(
        &mut self,
        inputs: bool,
        intermediates: bool,
        f: &mut dyn FnMut(&mut Tensor) -> megamoe_tensor::Result<()>,
    ) -> megamoe_tensor::Result<()> {
        if inputs {
            f(&mut self.x)?;
        }
        if intermediates {
            f(&mut self.h)?;
            f(&mut self.act)?;
        }
        Ok(())
    }
}

/// What an expert bank's `backward_weight` needs.
#[derive(Debug, Clone)]
pub struct ExpertsDeferredW {
    x: Tensor,
    groups: RowGroups,
    act: Tensor,
    d_out: Tensor,
    /// Gradient of the pre-activation, `h`'s shape.
    d_h: Tensor,
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
    /// Accumulates (+=) dW_in and dW_down into `grads`.
    fn backward_weight(&self, w: ExpertsDeferredW, grads: &mut RoutedExpertsParams) -> Result<()>;
}

/// Rows of one expert's input projection: `2F` for swiglu (gate and up fused), else `F`.
pub fn in_proj_rows(activation: Activation, hidden: usize) -> usize {
    match activation {
        Activation::SwiGlu => 2 * hidden,
        Activation::Relu2 | Activation::Gelu => hidden,
    }
}

/// The parameter name of the input projection: `experts.gate_up_proj` (swiglu) or
/// `experts.up_proj`.
pub fn in_proj_name(activation: Activation) -> &'static str {
    match activation {
        Activation::SwiGlu => "experts.gate_up_proj",
        Activation::Relu2 | Activation::Gelu => "experts.up_proj",
    }
}

/// Checks weight shapes against the config.
pub fn check_expert_params(cfg: &RoutedExpertsConfig, p: &RoutedExpertsParams) -> Result<()> {
    let (e, h, f) = (cfg.num_routed_experts, cfg.d_model, cfg.hidden);
    let rows = in_proj_rows(cfg.activation, f);
    check_shape(in_proj_name(cfg.activation), &p.in_proj, &[e, rows, h])?;
    check_shape("experts.down_proj", &p.down_proj, &[e, h, f])
}

/// Activation forward on the pre-activation `h` (gate‖up rows for swiglu) → act.
fn activate(act: Activation, h: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::SwiGlu => h.swiglu_gate_up()?,
        Activation::Relu2 => h.relu2()?,
        Activation::Gelu => h.gelu()?,
    })
}

/// Activation backward: d_act → d_h (`h`'s shape).
fn activate_backward(act: Activation, h: &Tensor, d_act: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::SwiGlu => Tensor::swiglu_gate_up_backward(h, d_act)?,
        Activation::Relu2 => h.relu2_backward(d_act)?,
        Activation::Gelu => h.gelu_backward(d_act)?,
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
        let h = x.grouped_matmul(groups, &p.in_proj, true)?;
        let act = activate(self.cfg.activation, &h)?;
        let y = act.grouped_matmul(groups, &p.down_proj, true)?;
        Ok((
            y,
            ExpertsSaved {
                x: x.clone(),
                groups: groups.clone(),
                h,
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
        let w = self.backward_pre_activation(p, d_y, s)?;
        // swiglu: d_x = d_gate·W_gate + d_up·W_up as ONE GEMM over the 2F fused rows.
        let d_x = w.d_h.grouped_matmul(&w.groups, &p.in_proj, false)?;
        Ok((d_x, w))
    }

    fn backward_weight(&self, w: ExpertsDeferredW, g: &mut RoutedExpertsParams) -> Result<()> {
        // dW += dy_gᵀ x_g straight into the gradient buffers (gemm's beta = 1).
        let gs = &w.groups;
        g.down_proj
            .grouped_matmul_wgrad_acc(&w.d_out, &w.act, gs, 1.0)?;
        g.in_proj.grouped_matmul_wgrad_acc(&w.d_h, &w.x, gs, 1.0)?;
        Ok(())
    }
}

impl GroupedExperts {
    /// [`ExpertBank::backward_input`] adding the input gradient onto `d_x [R, H]` (its
    /// group rows; beta 1 in the last GEMM) instead of writing it fresh: the shared experts'
    /// input gradient lands on the routed one's without a temporary or an add pass (one
    /// rounding of the sum instead of two in bf16).
    pub fn backward_input_acc(
        &self,
        p: &RoutedExpertsParams,
        d_y: &Tensor,
        s: ExpertsSaved,
        d_x: &mut Tensor,
    ) -> Result<ExpertsDeferredW> {
        let w = self.backward_pre_activation(p, d_y, s)?;
        d_x.grouped_matmul_acc(&w.d_h, &w.groups, &p.in_proj, false, 1.0)?;
        Ok(w)
    }

    /// The backward up to the pre-activation gradient `d_h` (in the deferred weight work).
    fn backward_pre_activation(
        &self,
        p: &RoutedExpertsParams,
        d_y: &Tensor,
        s: ExpertsSaved,
    ) -> Result<ExpertsDeferredW> {
        let gs = &s.groups;
        // The output gradient in the activations' dtype, cast once for both GEMMs that read
        // it (this input gradient and the deferred down-projection weight gradient): bf16
        // activations (a GPU's bf16 mode) mean bf16 GEMMs, which would each round it to
        // bf16; f32 activations (CPU, parity mode) leave it as it is.
        let d_y = d_y.to_dtype(s.act.dtype())?;
        let d_act = d_y.grouped_matmul(gs, &p.down_proj, false)?;
        let d_h = activate_backward(self.cfg.activation, &s.h, &d_act)?;
        Ok(ExpertsDeferredW {
            x: s.x,
            groups: s.groups,
            act: s.act,
            d_out: d_y,
            d_h,
        })
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
        let width = in_proj_rows(self.cfg.activation, f);
        let spans = host_spans(groups)?;
        let (mut hs, mut acts, mut ys) = (Vec::new(), Vec::new(), Vec::new());
        for (e, &(start, n)) in spans.iter().enumerate() {
            let xe = x.narrow(0, start, n)?;
            let h = xe.matmul(&expert_matrix(&p.in_proj, e)?, false, true)?;
            let a = activate(self.cfg.activation, &h)?;
            ys.push(a.matmul(&expert_matrix(&p.down_proj, e)?, false, true)?);
            hs.push(h);
            acts.push(a);
        }
        Ok((
            assemble(&ys, &spans, rows, self.cfg.d_model, x)?,
            ExpertsSaved {
                x: x.clone(),
                groups: groups.clone(),
                h: assemble(&hs, &spans, rows, width, x)?,
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
        let width = in_proj_rows(self.cfg.activation, self.cfg.hidden);
        let spans = host_spans(&s.groups)?;
        let (mut d_xs, mut d_hs) = (Vec::new(), Vec::new());
        for (e, &(start, n)) in spans.iter().enumerate() {
            let dye = d_y.narrow(0, start, n)?;
            let d_act = dye.matmul(&expert_matrix(&p.down_proj, e)?, false, false)?;
            let he = s.h.narrow(0, start, n)?;
            let dh = activate_backward(self.cfg.activation, &he, &d_act)?;
            d_xs.push(dh.matmul(&expert_matrix(&p.in_proj, e)?, false, false)?);
            d_hs.push(dh);
        }
        Ok((
            assemble(&d_xs, &spans, rows, h, d_y)?,
            ExpertsDeferredW {
                x: s.x,
                act: s.act,
                d_out: d_y.clone(),
                d_h: assemble(&d_hs, &spans, rows, width, d_y)?,
                groups: s.groups,
            },
        ))
    }

    fn backward_weight(&self, w: ExpertsDeferredW, g: &mut RoutedExpertsParams) -> Result<()> {
        let (h, f) = (self.cfg.d_model, self.cfg.hidden);
        let width = in_proj_rows(self.cfg.activation, f);
        let spans = host_spans(&w.groups)?;
        let mut d_down = Vec::new();
        let mut d_in = Vec::new();
        for &(start, n) in &spans {
            let dy = w.d_out.narrow(0, start, n)?;
            d_down.push(
                dy.matmul(&w.act.narrow(0, start, n)?, true, false)?
                    .reshape([1, h, f])?,
            );
            let x = w.x.narrow(0, start, n)?;
            d_in.push(
                w.d_h
                    .narrow(0, start, n)?
                    .matmul(&x, true, false)?
                    .reshape([1, width, h])?,
            );
        }
        debug_assert_eq!(d_down.len(), self.cfg.num_routed_experts);
        let stack = |v: &[Tensor]| -> Result<Tensor> {
            let refs: Vec<&Tensor> = v.iter().collect();
            Ok(Tensor::cat(&refs, 0)?)
        };
        g.down_proj.add_assign(&stack(&d_down)?)?;
        g.in_proj.add_assign(&stack(&d_in)?)?;
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
        Ok(vec![y, dx, g.in_proj, g.down_proj])
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
        in_proj: zeros_like(&p.in_proj)?,
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
