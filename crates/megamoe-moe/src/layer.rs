//! [`MoeLayer`]: router → capacity → dispatch → routed experts → combine, plus the shared
//! experts and the router losses. Composition only; each stage lives in its own file.
//!
//! `y = y_shared + Σ_kept g · expert(x)` for `x [N, H]` (MOE_DECISIONS §1-12).
//!
//! The layer gets its [`TokenDispatcher`] from outside ([`MoeLayer::with_dispatcher`]); its
//! routed-expert weights are the dispatcher's local experts `[e0, e1)`. Forward saves the
//! routing, both dispatch layouts and each part's saved state ([`MoeSaved`]).
//! `backward_input` writes `d_x` fresh and returns [`MoeDeferredW`]; `backward_weight` accumulates (+=) into a [`MoeParams`] of gradients. The router-loss
//! gradients enter `backward_input` through [`RouterLossScale`] (weight /
//! (grad_accum · num_chunks), applied exactly once).

use std::ops::Range;
use std::sync::Arc;

use megamoe_tensor::ops::router::RouteLossGrads;
use megamoe_tensor::Tensor;

use crate::capacity::apply_capacity;
use crate::config::MoeConfig;
use crate::dispatch::{
    Assignments, DispatchLayout, ExpertLayout, LocalDispatcher, TokenDispatcher,
};
use crate::error::{shape_str, Error, Result};
use crate::experts::{
    check_expert_params, ExpertBank, ExpertsDeferredW, ExpertsSaved, GroupedExperts,
};
use crate::losses::{
    aux_loss_backward, aux_loss_forward_with, z_loss_backward, z_loss_forward_from, AuxInputs,
    AuxLossSaved, RouterLossScale, ZLossSaved,
};
use crate::params::MoeParams;
use crate::router::{Router, RouterSaved, Routing};
use crate::shared::{SharedExperts, SharedExpertsDeferredW, SharedExpertsSaved};
use crate::stats::{kept_expert_ids, MoeStats};
use crate::tp::TensorParallel;

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
    /// `[N, K]` 1 for a kept assignment.
    keep: Tensor,
    router: RouterSaved,
    layout: DispatchLayout,
    expert_layout: ExpertLayout,
    experts: ExpertsSaved,
    /// Expert outputs back at the source, in the source row layout.
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

    /// `[N, K]` f32: 1 for each assignment kept after capacity.
    pub fn keep(&self) -> &Tensor {
        &self.keep
    }

    /// Visits the saved activations for offload, always in the same order: with
    /// `intermediates` the routed experts' pre-activations and activation, the expert
    /// rows back at the source and the shared experts' pre-activations and activation;
    /// with `inputs` the routed experts' input rows.
    pub fn visit_activations(
        &mut self,
        inputs: bool,
        intermediates: bool,
        f: &mut dyn FnMut(&mut Tensor) -> megamoe_tensor::Result<()>,
    ) -> megamoe_tensor::Result<()> {
        self.experts.visit_activations(inputs, intermediates, f)?;
        if intermediates {
            f(&mut self.out_rows)?;
            if let Some(s) = &mut self.shared {
                s.visit_intermediates(f)?;
            }
        }
        Ok(())
    }

    /// The source-side dispatch layout of the forward call.
    pub fn layout(&self) -> &DispatchLayout {
        &self.layout
    }

    /// The expert-side layout the dispatch exchange delivered.
    pub fn expert_layout(&self) -> &ExpertLayout {
        &self.expert_layout
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
    dispatcher: Arc<dyn TokenDispatcher>,
    router: Router,
    routed_experts: GroupedExperts,
    shared_experts: Option<SharedExperts>,
}

impl MoeLayer {
    /// A single-rank layer for a validated config: every expert is local
    /// ([`LocalDispatcher`]).
    pub fn new(cfg: MoeConfig) -> Result<MoeLayer> {
        let local = LocalDispatcher::new(cfg.router.num_routed_experts);
        MoeLayer::with_dispatcher(cfg, Arc::new(local))
    }

    /// A layer whose tokens move through `dispatcher` (e.g. an
    /// [`ExpertParallelDispatcher`](crate::ExpertParallelDispatcher)); its routed-expert
    /// weights are the dispatcher's local experts.
    pub fn with_dispatcher(
        cfg: MoeConfig,
        dispatcher: Arc<dyn TokenDispatcher>,
    ) -> Result<MoeLayer> {
        cfg.validate()?;
        let e = cfg.router.num_routed_experts;
        let local = dispatcher.local_experts();
        if dispatcher.num_experts() != e || local.start >= local.end || local.end > e {
            return Err(Error::Config {
                field: "moe.routed_experts",
                value: format!(
                    "{e} (dispatcher: {} experts, local {local:?})",
                    dispatcher.num_experts()
                ),
                rule: "the dispatcher must serve the layer's experts with a non-empty local range",
            });
        }
        Ok(MoeLayer {
            router: Router::new(cfg.router.clone()),
            routed_experts: GroupedExperts {
                cfg: crate::config::RoutedExpertsConfig {
                    num_routed_experts: local.len(),
                    ..cfg.routed_experts
                },
            },
            shared_experts: cfg.shared_experts.map(SharedExperts::new),
            dispatcher,
            cfg,
        })
    }

    /// The layer with its shared experts split over a tensor-parallel group
    /// ([`SharedExperts::with_tensor_parallel`]); router and routed experts stay whole on
    /// every TP rank. Its parameters come from [`MoeParams::init_shard`] with the same
    /// group. The shared experts then run on the caller's thread (their all-reduce never
    /// overlaps the dispatcher's collectives).
    pub fn with_tensor_parallel(mut self, tp: TensorParallel) -> Result<MoeLayer> {
        if let Some(cfg) = self.cfg.shared_experts {
            self.shared_experts = Some(SharedExperts::with_tensor_parallel(cfg, tp)?);
        }
        Ok(self)
    }

    /// The dispatcher moving this layer's tokens.
    pub fn dispatcher(&self) -> &dyn TokenDispatcher {
        self.dispatcher.as_ref()
    }

    /// `[e0, e1)`: the experts whose weights this layer holds.
    pub fn local_experts(&self) -> Range<usize> {
        self.dispatcher.local_experts()
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
        check_expert_params(&self.routed_experts.cfg, &params.experts)?;
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
        let picks_per_slot = routing.slots.slot_counts(None, c.router.pool_size(), n)?;
        // The losses read the softmax, logsumexp and pick counts computed above.
        let have = AuxInputs {
            softmax: Some(router_saved.probs()),
            picks_per_slot: Some(&picks_per_slot),
        };
        let (aux_loss, aux) = aux_loss_forward_with(
            c.aux_loss,
            c.router.score_fn,
            &z,
            &routing.slots,
            c.seq_len,
            have,
        )?;
        let (z_loss, z_saved) =
            z_loss_forward_from(router_saved.probs().clone(), router_saved.lse().clone())?;

        // 1. dispatch: permute (local) → exchange (collective) → expert buffers (local)
        let d = self.dispatcher.as_ref();
        let pad_to = if c.pad_to_capacity {
            c.capacity_for(n)
        } else {
            None
        };
        let assignments = Assignments {
            slots: &routing.slots,
            keep: &keep,
            gates: &routing.gates,
        };
        let (rows, layout) = d.permute(x, assignments, pad_to, c.fast_paths.fused_permute)?;
        let expert_layout = d.exchange_layout(&layout)?;
        let rows = d.dispatch_exchange(rows, &expert_layout)?;
        let buffers = d.expert_buffers(rows, &expert_layout)?;
        // 2. routed experts on the local buffers
        let (out, experts) =
            self.routed_experts
                .forward(&params.experts, &buffers, &expert_layout.groups)?;
        // 3. combine: unbuffer (local) → exchange back (collective) → weighted sum (local)
        let out_rows = d.combine_exchange(d.unbuffer(out, &expert_layout)?, &expert_layout)?;
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
            keep,
            router_saved,
            layout,
            expert_layout,
            experts,
            out_rows,
            aux,
            z_saved,
        })
    }

    /// `x [N, H]` → output and saved state.
    pub fn forward(&self, params: &MoeParams, x: &Tensor) -> Result<(MoeOutput, MoeSaved)> {
        self.forward_impl(params, x, None)
    }

    /// [`MoeLayer::forward`] with the block's residual stream `residual [N, H]` added to
    /// the output: `y = residual + (y_shared + y_routed)` in one op ([`Tensor::add_sum`]: on
    /// the CPU the bits of `residual.add(&forward(..).y)`, on a GPU one pass instead of two
    /// adds). The saved state and backward are [`MoeLayer::forward`]'s (`d_residual = d_y`).
    pub fn forward_residual(
        &self,
        params: &MoeParams,
        x: &Tensor,
        residual: &Tensor,
    ) -> Result<(MoeOutput, MoeSaved)> {
        if residual.dims() != x.dims() {
            return Err(Error::ParamShape {
                what: "residual",
                expected: x.dims().to_vec(),
                got: residual.dims().to_vec(),
            });
        }
        self.forward_impl(params, x, Some(residual))
    }

    fn forward_impl(
        &self,
        params: &MoeParams,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<(MoeOutput, MoeSaved)> {
        let n = self.check_input(params, x)?;
        let shared_fwd = || -> Result<Option<(Tensor, SharedExpertsSaved)>> {
            match (&self.shared_experts, &params.shared_experts) {
                (Some(s), Some(p)) => Ok(Some(s.forward(p, x)?)),
                _ => Ok(None),
            }
        };
        let split = self
            .shared_experts
            .as_ref()
            .is_some_and(SharedExperts::is_tensor_parallel);
        let (routed, shared) = if self.cfg.fast_paths.overlap_shared && !split {
            // The shared experts run on a helper thread while this thread routes and
            // dispatches: the dispatcher's collectives stay on the caller's thread, never in
            // a rayon worker, where a rank blocked in an exchange could starve other ranks.
            std::thread::scope(|scope| {
                let shared = scope.spawn(shared_fwd);
                let r = self.routed_forward(params, x, n);
                let s = shared
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                Ok::<_, Error>((r?, s?))
            })?
        } else {
            let r = self.routed_forward(params, x, n)?;
            (r, shared_fwd()?)
        };
        let (y, shared_saved) = match (shared, residual) {
            (Some((ys, s)), Some(r)) => (r.add_sum(&ys, &routed.y)?, Some(s)),
            (Some((ys, s)), None) => (ys.add(&routed.y)?, Some(s)),
            (None, Some(r)) => (r.add(&routed.y)?, None),
            (None, None) => (routed.y, None),
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
                keep: routed.keep,
                router: routed.router_saved,
                layout: routed.layout,
                expert_layout: routed.expert_layout,
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
        let d = self.dispatcher.as_ref();
        let (layout, el) = (&saved.layout, &saved.expert_layout);
        // combine → experts → dispatch, in reverse: the combine's backward sends the row
        // gradients to the experts (dispatch direction), the permute's brings them back.
        let (d_out_rows, d_gates) = d.combine_backward(d_y, &saved.out_rows, layout)?;
        let d_out = d.expert_buffers(d.dispatch_exchange(d_out_rows, el)?, el)?;
        let (d_buffers, experts_w) =
            self.routed_experts
                .backward_input(&params.experts, &d_out, saved.experts)?;
        let d_rows = d.combine_exchange(d.unbuffer(d_buffers, el)?, el)?;
        let mut d_x = d.dispatch_backward(&d_rows, layout)?;
        // router: gates, then the losses through the same logits (aux, then z). Through
        // softmax probabilities (the router's own) both losses join the gates' op.
        let aux = saved.aux.as_ref().filter(|_| scale.aux != 0.0);
        let z = (scale.z != 0.0).then(|| saved.z.grad_term(scale.z));
        let d_logits = match aux {
            Some(a) if a.softmax_grad_term(scale.aux).is_none() => {
                // sigmoid scores: the aux loss goes through σ, in its own ops
                let mut d = self.router.routing_backward(&saved.router, &d_gates)?;
                d.add_assign(&aux_loss_backward(a, scale.aux)?)?;
                if z.is_some() {
                    d.add_assign(&z_loss_backward(&saved.z, scale.z)?)?;
                }
                d
            }
            _ => {
                let losses = RouteLossGrads {
                    aux: aux.and_then(|a| a.softmax_grad_term(scale.aux)),
                    z,
                };
                self.router
                    .routing_backward_with(&saved.router, &d_gates, losses)?
            }
        };
        // The router's input gradient accumulates in its GEMM, and so does the shared
        // experts' (in the activation dtype: the block's norm backward reads this sum as an
        // activation gradient).
        self.router
            .gating_backward_input_acc(&params.router, &d_logits, &mut d_x)?;
        let shared = match (&self.shared_experts, &params.shared_experts, saved.shared) {
            (Some(s), Some(p), Some(ss)) => Some(s.backward_input_acc(p, d_y, ss, &mut d_x)?),
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
    keep: Tensor,
    router_saved: RouterSaved,
    layout: DispatchLayout,
    expert_layout: ExpertLayout,
    experts: ExpertsSaved,
    out_rows: Tensor,
    aux: Option<AuxLossSaved>,
    z_saved: ZLossSaved,
}
