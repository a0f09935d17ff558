//! [`MoeLayer`]: router → capacity → dispatch → routed experts → combine, plus the shared
//! experts and the router losses. Composition only; each stage lives in its own file.
//!
//! `y = y_shared + Σ_kept g · expert(x)` for `x [N, H]` (MOE_DECISIONS §1-12).
//!
//! Forward saves the routing, the dispatch layout and each part's saved state
//! ([`MoeSaved`]). `backward_input` writes `d_x` fresh and returns [`MoeDeferredW`];
//! `backward_weight` accumulates (+=) into a [`MoeParams`] of gradients. The router-loss
//! gradients enter `backward_input` through [`RouterLossScale`] (weight /
//! (grad_accum · num_chunks), applied exactly once).

use megamoe_plan::Activation;
use megamoe_tensor::{DType, Device, ParamRole, Tensor};

use crate::capacity::apply_capacity;
use crate::config::MoeConfig;
use crate::dispatch::{DispatchLayout, LocalDispatcher, TokenDispatcher};
use crate::error::{shape_str, Error, Result};
use crate::experts::{
    check_expert_params, zeros_like, ExpertBank, ExpertsDeferredW, ExpertsSaved, GroupedExperts,
    RoutedExpertsParams,
};
use crate::losses::{
    aux_loss_backward, aux_loss_forward, z_loss_backward, z_loss_forward, AuxLossSaved,
    RouterLossScale, ZLossSaved,
};
use crate::router::{Router, RouterParams, RouterSaved, Routing};
use crate::shared::{
    SharedExperts, SharedExpertsDeferredW, SharedExpertsParams, SharedExpertsSaved,
};
use crate::stats::{kept_expert_ids, MoeStats};

/// Every weight of one MoE layer; the same type holds gradients and optimizer moments.
#[derive(Debug, Clone)]
pub struct MoeParams {
    /// Router weights (`router.weight [E, H]`, `router.null_weight [1, H]`) and the
    /// `router.expert_bias [E]` buffer.
    pub router: RouterParams,
    /// `experts.gate_proj [E, F, H]`, `experts.up_proj [E, F, H]`, `experts.down_proj [E, H, F]`.
    pub experts: RoutedExpertsParams,
    /// `shared_experts.{gate,up,down}_proj [Fs, H] / [Fs, H] / [H, Fs]` and
    /// `shared_expert_gate.weight [1, H]`.
    pub shared_experts: Option<SharedExpertsParams>,
}

/// Parameter names (PyTorch/HF style, relative to the layer prefix) in visiting order.
pub const PARAM_NAMES: [&str; 9] = [
    "router.weight",
    "router.null_weight",
    "experts.gate_proj",
    "experts.up_proj",
    "experts.down_proj",
    "shared_experts.gate_proj",
    "shared_experts.up_proj",
    "shared_experts.down_proj",
    "shared_expert_gate.weight",
];

impl MoeParams {
    /// Shapes of every trained parameter of `cfg`, by name (no buffers).
    pub fn shapes(cfg: &MoeConfig) -> Vec<(&'static str, Vec<usize>, ParamRole)> {
        let (e, h, f) = (
            cfg.router.num_routed_experts,
            cfg.d_model,
            cfg.routed_experts.hidden,
        );
        let swiglu = cfg.routed_experts.activation == Activation::SwiGlu;
        let mut v = vec![("router.weight", vec![e, h], ParamRole::Matrix)];
        if cfg.router.null_slots.is_some() {
            v.push(("router.null_weight", vec![1, h], ParamRole::Gate));
        }
        if swiglu {
            v.push(("experts.gate_proj", vec![e, f, h], ParamRole::ExpertBank));
        }
        v.push(("experts.up_proj", vec![e, f, h], ParamRole::ExpertBank));
        v.push(("experts.down_proj", vec![e, h, f], ParamRole::ExpertBank));
        if let Some(s) = &cfg.shared_experts {
            if swiglu {
                v.push((
                    "shared_experts.gate_proj",
                    vec![s.hidden, h],
                    ParamRole::Matrix,
                ));
            }
            v.push((
                "shared_experts.up_proj",
                vec![s.hidden, h],
                ParamRole::Matrix,
            ));
            v.push((
                "shared_experts.down_proj",
                vec![h, s.hidden],
                ParamRole::Matrix,
            ));
            if s.gate {
                v.push(("shared_expert_gate.weight", vec![1, h], ParamRole::Gate));
            }
        }
        v
    }

    /// Builds params from a lookup by name (relative names of [`PARAM_NAMES`]); the expert
    /// bias buffer is looked up as `router.expert_bias` when `cfg.router.expert_bias`
    /// (absent → zeros). Missing or mis-shaped tensors are named errors.
    pub fn from_lookup(
        cfg: &MoeConfig,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<MoeParams> {
        let mut take = |name: &'static str, shape: Vec<usize>| -> Result<Tensor> {
            let t = get(name).ok_or_else(|| Error::MissingTensor {
                name: name.into(),
                expected: shape_str(&shape),
            })?;
            check_named(name, &t, &shape)?;
            Ok(t)
        };
        let mut map = std::collections::BTreeMap::new();
        for (name, shape, _) in MoeParams::shapes(cfg) {
            map.insert(name, take(name, shape)?);
        }
        let e = cfg.router.num_routed_experts;
        let expert_bias = if cfg.router.expert_bias {
            match get("router.expert_bias") {
                Some(b) => {
                    check_named("router.expert_bias", &b, &[e])?;
                    Some(b)
                }
                None => Some(Tensor::zeros([e], DType::F32, Device::Cpu)?),
            }
        } else {
            None
        };
        Ok(MoeParams::from_map(cfg, map, expert_bias))
    }

    fn from_map(
        cfg: &MoeConfig,
        mut m: std::collections::BTreeMap<&'static str, Tensor>,
        expert_bias: Option<Tensor>,
    ) -> MoeParams {
        let mut t = |n| m.remove(n);
        let router = RouterParams {
            weight: t("router.weight").expect("shapes() always lists router.weight"),
            null_weight: t("router.null_weight"),
            expert_bias,
        };
        let experts = RoutedExpertsParams {
            gate_proj: t("experts.gate_proj"),
            up_proj: t("experts.up_proj").expect("shapes() always lists experts.up_proj"),
            down_proj: t("experts.down_proj").expect("shapes() always lists experts.down_proj"),
        };
        let shared_experts = if cfg.shared_experts.is_some() {
            Some(SharedExpertsParams {
                gate_proj: t("shared_experts.gate_proj"),
                up_proj: t("shared_experts.up_proj")
                    .expect("shapes() lists shared_experts.up_proj when shared experts are on"),
                down_proj: t("shared_experts.down_proj")
                    .expect("shapes() lists shared_experts.down_proj when shared experts are on"),
                gate: t("shared_expert_gate.weight"),
            })
        } else {
            None
        };
        MoeParams {
            router,
            experts,
            shared_experts,
        }
    }

    /// Layout-invariant init: every parameter `N(0, 1/fan_in)` drawn by
    /// `Tensor::randn_named(seed, prefix + name, ..)`; the expert bias starts at zero.
    pub fn init(cfg: &MoeConfig, seed: u64, prefix: &str) -> Result<MoeParams> {
        let mut map = std::collections::BTreeMap::new();
        for (name, shape, _) in MoeParams::shapes(cfg) {
            let fan_in = *shape.last().expect("parameter shapes have rank >= 2") as f32;
            let t = Tensor::randn_named(
                seed,
                &format!("{prefix}{name}"),
                shape,
                fan_in.powf(-0.5),
                Device::Cpu,
            )?;
            map.insert(name, t);
        }
        let bias = if cfg.router.expert_bias {
            Some(Tensor::zeros(
                [cfg.router.num_routed_experts],
                DType::F32,
                Device::Cpu,
            )?)
        } else {
            None
        };
        Ok(MoeParams::from_map(cfg, map, bias))
    }

    /// Zeros shaped like every parameter (a gradient accumulator); no expert-bias buffer.
    pub fn zeros_like(&self) -> Result<MoeParams> {
        let z = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref().map(zeros_like).transpose()
        };
        Ok(MoeParams {
            router: RouterParams {
                weight: zeros_like(&self.router.weight)?,
                null_weight: z(&self.router.null_weight)?,
                expert_bias: None,
            },
            experts: RoutedExpertsParams {
                gate_proj: z(&self.experts.gate_proj)?,
                up_proj: zeros_like(&self.experts.up_proj)?,
                down_proj: zeros_like(&self.experts.down_proj)?,
            },
            shared_experts: match &self.shared_experts {
                Some(s) => Some(SharedExpertsParams {
                    gate_proj: z(&s.gate_proj)?,
                    up_proj: zeros_like(&s.up_proj)?,
                    down_proj: zeros_like(&s.down_proj)?,
                    gate: z(&s.gate)?,
                }),
                None => None,
            },
        })
    }

    /// Visits every trained parameter as (`prefix + name`, tensor, role). The expert bias
    /// is a buffer and is not visited (see [`MoeParams::visit_buffers`]).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        let mut each = |name: &str, t: Option<&Tensor>, role| {
            if let Some(t) = t {
                f(&format!("{prefix}{name}"), t, role);
            }
        };
        each(
            "router.weight",
            Some(&self.router.weight),
            ParamRole::Matrix,
        );
        each(
            "router.null_weight",
            self.router.null_weight.as_ref(),
            ParamRole::Gate,
        );
        each(
            "experts.gate_proj",
            self.experts.gate_proj.as_ref(),
            ParamRole::ExpertBank,
        );
        each(
            "experts.up_proj",
            Some(&self.experts.up_proj),
            ParamRole::ExpertBank,
        );
        each(
            "experts.down_proj",
            Some(&self.experts.down_proj),
            ParamRole::ExpertBank,
        );
        if let Some(s) = &self.shared_experts {
            each(
                "shared_experts.gate_proj",
                s.gate_proj.as_ref(),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.up_proj",
                Some(&s.up_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.down_proj",
                Some(&s.down_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_expert_gate.weight",
                s.gate.as_ref(),
                ParamRole::Gate,
            );
        }
    }

    /// Mutable twin of [`MoeParams::visit`] (same names, same order).
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        let mut each = |name: &str, t: Option<&mut Tensor>, role| {
            if let Some(t) = t {
                f(&format!("{prefix}{name}"), t, role);
            }
        };
        each(
            "router.weight",
            Some(&mut self.router.weight),
            ParamRole::Matrix,
        );
        each(
            "router.null_weight",
            self.router.null_weight.as_mut(),
            ParamRole::Gate,
        );
        each(
            "experts.gate_proj",
            self.experts.gate_proj.as_mut(),
            ParamRole::ExpertBank,
        );
        each(
            "experts.up_proj",
            Some(&mut self.experts.up_proj),
            ParamRole::ExpertBank,
        );
        each(
            "experts.down_proj",
            Some(&mut self.experts.down_proj),
            ParamRole::ExpertBank,
        );
        if let Some(s) = &mut self.shared_experts {
            each(
                "shared_experts.gate_proj",
                s.gate_proj.as_mut(),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.up_proj",
                Some(&mut s.up_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.down_proj",
                Some(&mut s.down_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_expert_gate.weight",
                s.gate.as_mut(),
                ParamRole::Gate,
            );
        }
    }

    /// Visits the non-trained buffers: `router.expert_bias` when present.
    pub fn visit_buffers(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor)) {
        if let Some(b) = &self.router.expert_bias {
            f(&format!("{prefix}router.expert_bias"), b);
        }
    }
}

fn check_named(name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::TensorDType {
            name: name.into(),
            expected: "f32",
            got: t.dtype().to_string(),
        });
    }
    if t.dims() != shape {
        return Err(Error::TensorShape {
            name: name.into(),
            expected: shape.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// What one forward call produces.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// `[N, H]` layer output.
    pub y: Tensor,
    /// Rank-0 balancing loss (unweighted; 0 for `aux_loss = "none"`).
    pub aux_loss: Tensor,
    /// Rank-0 z-loss (unweighted).
    pub z_loss: Tensor,
    /// Routing counts of this call.
    pub stats: MoeStats,
}

/// What forward keeps for `backward_input` (moved by value).
#[derive(Debug)]
pub struct MoeSaved {
    x: Tensor,
    routing: Routing,
    router: RouterSaved,
    layout: DispatchLayout,
    experts: ExpertsSaved,
    /// `[R, H]` expert outputs in permuted order (pad rows removed).
    out_rows: Tensor,
    shared: Option<SharedExpertsSaved>,
    aux: Option<AuxLossSaved>,
    z: ZLossSaved,
}

impl MoeSaved {
    /// The routing decision of the forward call.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The dispatch layout of the forward call.
    pub fn layout(&self) -> &DispatchLayout {
        &self.layout
    }
}

/// What `backward_input` leaves for `backward_weight` (moved by value).
#[derive(Debug)]
pub struct MoeDeferredW {
    x: Tensor,
    /// `[N, Ep]` total gradient of the pool logits.
    d_logits: Tensor,
    experts: ExpertsDeferredW,
    shared: Option<SharedExpertsDeferredW>,
}

/// One MoE layer (stateless: parameters are passed in).
#[derive(Debug, Clone)]
pub struct MoeLayer {
    cfg: MoeConfig,
    router: Router,
    routed_experts: GroupedExperts,
    shared_experts: Option<SharedExperts>,
}

impl MoeLayer {
    /// A layer for a validated config.
    pub fn new(cfg: MoeConfig) -> Result<MoeLayer> {
        cfg.validate()?;
        Ok(MoeLayer {
            router: Router::new(cfg.router.clone()),
            routed_experts: GroupedExperts {
                cfg: cfg.routed_experts,
            },
            shared_experts: cfg.shared_experts.map(SharedExperts::new),
            cfg,
        })
    }

    /// Its config.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The router-loss gradient scale for this layer's weights under `grad_accum`
    /// micro-batches and `num_chunks` pipeline chunks.
    pub fn loss_scale(&self, grad_accum: usize, num_chunks: usize) -> Result<RouterLossScale> {
        RouterLossScale::new(
            crate::losses::RouterLossWeights {
                aux: self.cfg.aux_loss_weight,
                z: self.cfg.z_loss_weight,
            },
            grad_accum,
            num_chunks,
        )
    }

    fn dispatcher(&self, tokens: usize) -> LocalDispatcher {
        LocalDispatcher {
            num_routed_experts: self.cfg.router.num_routed_experts,
            fast_paths: self.cfg.fast_paths,
            pad_to: if self.cfg.pad_to_capacity {
                self.cfg.capacity_for(tokens)
            } else {
                None
            },
        }
    }

    fn check_input(&self, params: &MoeParams, x: &Tensor) -> Result<usize> {
        let h = self.cfg.d_model;
        if x.rank() != 2 || x.dims()[1] != h {
            return Err(Error::ParamShape {
                what: "x",
                expected: vec![x.dims().first().copied().unwrap_or(0), h],
                got: x.dims().to_vec(),
            });
        }
        let n = x.dims()[0];
        if n == 0 || !n.is_multiple_of(self.cfg.seq_len) {
            return Err(Error::Tokens {
                tokens: n,
                rule: format!(
                    "must be a positive multiple of model.seq_len={}",
                    self.cfg.seq_len
                ),
            });
        }
        self.router.check_params(&params.router)?;
        check_expert_params(&self.cfg.routed_experts, &params.experts)?;
        match (&self.shared_experts, &params.shared_experts) {
            (Some(s), Some(p)) => s.check_params(p)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::MissingTensor {
                    name: "shared_experts.up_proj".into(),
                    expected: shape_str(&[self.cfg.shared_experts.map_or(0, |s| s.hidden), h]),
                })
            }
            (None, Some(_)) => {
                return Err(Error::Config {
                    field: "moe.shared_experts",
                    value: "0".into(),
                    rule: "shared-expert params were given to a layer without shared experts",
                })
            }
        }
        Ok(n)
    }

    /// Route → dispatch → routed experts → combine (everything but the shared path).
    fn routed_forward(&self, params: &MoeParams, x: &Tensor, n: usize) -> Result<RoutedForward> {
        let c = &self.cfg;
        let e = c.router.num_routed_experts;
        let z = self.router.gating(&params.router, x)?;
        let (routing, router_saved) = self.router.routing(&params.router, &z)?;
        let keep = apply_capacity(&routing, e, c.capacity_for(n), c.drop_policy)?;
        let (aux_loss, aux) =
            aux_loss_forward(c.aux_loss, c.router.score_fn, &z, &routing.slots, c.seq_len)?;
        let (z_loss, z_saved) = z_loss_forward(&z)?;
        let picks_per_slot = routing.slots.slot_counts(None, c.router.pool_size(), n)?;

        let d = self.dispatcher(n);
        let (rows, layout) = d.permute(x, &routing.slots, &keep, &routing.gates)?;
        let rows = d.dispatch_exchange(rows, &layout)?;
        let buffers = d.expert_buffers(rows, &layout)?;
        let (out, experts) =
            self.routed_experts
                .forward(&params.experts, &buffers, &layout.group_sizes())?;
        let out_rows = d.combine_exchange(d.unbuffer(out, &layout)?, &layout)?;
        let y = d.combine(&out_rows, &layout)?;
        Ok(RoutedForward {
            y,
            aux_loss,
            z_loss,
            stats: MoeStats {
                picks_per_slot,
                tokens_per_expert: layout.counts.clone(),
                num_routed_experts: e,
                tokens: n,
                slots_per_token: c.router.slots_per_token(),
                token_experts: kept_expert_ids(&routing.slots, &keep)?,
                shared_gate_mean: None,
            },
            routing,
            router_saved,
            layout,
            experts,
            out_rows,
            aux,
            z_saved,
        })
    }

    /// `x [N, H]` → output and saved state.
    pub fn forward(&self, params: &MoeParams, x: &Tensor) -> Result<(MoeOutput, MoeSaved)> {
        let n = self.check_input(params, x)?;
        let shared_fwd = || -> Result<Option<(Tensor, SharedExpertsSaved)>> {
            match (&self.shared_experts, &params.shared_experts) {
                (Some(s), Some(p)) => Ok(Some(s.forward(p, x)?)),
                _ => Ok(None),
            }
        };
        let (routed, shared) = if self.cfg.fast_paths.overlap_shared {
            let (r, s) = rayon::join(|| self.routed_forward(params, x, n), shared_fwd);
            (r?, s?)
        } else {
            let r = self.routed_forward(params, x, n)?;
            (r, shared_fwd()?)
        };
        let (y, shared_saved) = match shared {
            Some((ys, s)) => (ys.add(&routed.y)?, Some(s)),
            None => (routed.y, None),
        };
        let mut stats = routed.stats;
        if let Some(s) = &shared_saved {
            stats.shared_gate_mean = s.gate_mean()?;
        }
        Ok((
            MoeOutput {
                y,
                aux_loss: routed.aux_loss,
                z_loss: routed.z_loss,
                stats,
            },
            MoeSaved {
                x: x.clone(),
                routing: routed.routing,
                router: routed.router_saved,
                layout: routed.layout,
                experts: routed.experts,
                out_rows: routed.out_rows,
                shared: shared_saved,
                aux: routed.aux,
                z: routed.z_saved,
            },
        ))
    }

    /// `d_y [N, H]` → `d_x [N, H]` (written fresh) and the deferred weight work. The
    /// router losses contribute `scale.aux · ∂aux/∂z + scale.z · ∂L_z/∂z`.
    pub fn backward_input(
        &self,
        params: &MoeParams,
        d_y: &Tensor,
        saved: MoeSaved,
        scale: RouterLossScale,
    ) -> Result<(Tensor, MoeDeferredW)> {
        if d_y.dims() != saved.x.dims() {
            return Err(Error::ParamShape {
                what: "d_y",
                expected: saved.x.dims().to_vec(),
                got: d_y.dims().to_vec(),
            });
        }
        let d = self.dispatcher(saved.layout.tokens);
        let layout = &saved.layout;
        // combine → experts → dispatch, in reverse.
        let (d_out_rows, d_gates) = d.combine_backward(d_y, &saved.out_rows, layout)?;
        let d_out = d.expert_buffers(d_out_rows, layout)?;
        let (d_buffers, experts_w) =
            self.routed_experts
                .backward_input(&params.experts, &d_out, saved.experts)?;
        let d_rows = d.unbuffer(d_buffers, layout)?;
        let mut d_x = d.dispatch_backward(&d_rows, layout)?;
        // router: gates, then the losses through the same logits.
        let mut d_logits = self.router.routing_backward(&saved.router, &d_gates)?;
        if let Some(aux) = &saved.aux {
            if scale.aux != 0.0 {
                d_logits.add_assign(&aux_loss_backward(aux, scale.aux)?)?;
            }
        }
        if scale.z != 0.0 {
            d_logits.add_assign(&z_loss_backward(&saved.z, scale.z)?)?;
        }
        d_x.add_assign(
            &self
                .router
                .gating_backward_input(&params.router, &d_logits)?,
        )?;
        let shared = match (&self.shared_experts, &params.shared_experts, saved.shared) {
            (Some(s), Some(p), Some(ss)) => {
                let (dxs, w) = s.backward_input(p, d_y, ss)?;
                d_x.add_assign(&dxs)?;
                Some(w)
            }
            _ => None,
        };
        Ok((
            d_x,
            MoeDeferredW {
                x: saved.x,
                d_logits,
                experts: experts_w,
                shared,
            },
        ))
    }

    /// Accumulates (+=) every weight gradient into `grads`; touches no activation gradient.
    pub fn backward_weight(&self, w: MoeDeferredW, grads: &mut MoeParams) -> Result<()> {
        self.router
            .gating_backward_weight(&w.x, &w.d_logits, &mut grads.router)?;
        self.routed_experts
            .backward_weight(w.experts, &mut grads.experts)?;
        if let (Some(s), Some(sw), Some(g)) = (
            &self.shared_experts,
            w.shared,
            grads.shared_experts.as_mut(),
        ) {
            s.backward_weight(sw, g)?;
        }
        Ok(())
    }

    /// I then W in one call (tests, non-pipelined training): returns `d_x`, accumulates
    /// into `grads`.
    pub fn backward(
        &self,
        params: &MoeParams,
        d_y: &Tensor,
        saved: MoeSaved,
        scale: RouterLossScale,
        grads: &mut MoeParams,
    ) -> Result<Tensor> {
        let (d_x, w) = self.backward_input(params, d_y, saved, scale)?;
        self.backward_weight(w, grads)?;
        Ok(d_x)
    }
}

/// Internal result of the routed path.
struct RoutedForward {
    y: Tensor,
    aux_loss: Tensor,
    z_loss: Tensor,
    stats: MoeStats,
    routing: Routing,
    router_saved: RouterSaved,
    layout: DispatchLayout,
    experts: ExpertsSaved,
    out_rows: Tensor,
    aux: Option<AuxLossSaved>,
    z_saved: ZLossSaved,
}
