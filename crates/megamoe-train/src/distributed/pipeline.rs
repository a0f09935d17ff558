//! Pipeline-parallel training: [`PipelineRank`] is one pipeline rank's share of a run
//! (the model stages it holds, their optimizer state, the step's schedule program),
//! and [`PipelineRank::step`] is one optimizer step of every schedule the generators
//! make (GPipe, 1F1B, interleaved, ZB-H1, ZBV, DualPipe, DualPipeV).
//!
//! A step, on every rank of the pipeline group (a [`Communicator`] of `parallel.pp`
//! ranks, thread ranks or MPI processes):
//!
//! ```text
//! batch → M micro-batches (the same rows as one rank's gradient accumulation; with
//!                 dp·ep data ranks, data rank d runs rows d·M .. (d+1)·M of dp·ep·M)
//! one ChunkStage per schedule stage of this rank (parameters by handle, zeroed grads)
//! run_rank        F / I / W / B / F&B as the schedule says; carries and gradients
//!                 travel over the CommTransport
//! sum_shared_gradients   tied/MTP embedding over every chain end, DualPipe's mirrored
//!                 stage copies: every copy holds the total
//! data reduce     with dp·ep > 1: dense gradients summed over the stage's dense
//!                 data-parallel group (dp·ep ranks), expert banks over its expert one
//!                 (dp ranks; each holds E/ep experts, tokens reach them by all-to-all
//!                 over the stage's EP group inside F and B), × 1/(dp·ep); with
//!                 parallel.fsdp 1/2 reduce-scattered into this rank's rows, the
//!                 optimizer on the rows, then all-gathered (module `pipeline_fsdp`)
//! losses          head stages' per-micro-batch values, all-reduced over the world
//!                 (zeros elsewhere: exact), averaged in micro-batch order as one rank does
//! clip            Σ g² of the parameters this rank owns (lowest holding pp rank, data
//!                 rank 0; expert shards on every ep rank), all-reduced in rank order →
//!                 global norm
//! optimizer       AdamW / Muon over this rank's distinct parameters (each whole on the
//!                 rank: Muon needs no gather); every copy steps identically
//! expert bias     routed picks per MoE layer all-reduced over the world (integers:
//!                 exact)
//! ```
//!
//! The micro-batches and every per-micro-batch quantity (aux, z, capacity, CE mean)
//! are those of one rank, so the step is the same mathematical step; only gradient
//! summation order differs (micro-batches accumulate in schedule order, shared copies
//! are summed after), which layout-invariance tests bound at 1e-5 relative.
//!
//! Per-rank busy / idle time of the schedule run is in [`PipelineStep::timing`]; set it
//! next to the simulator with [`megamoe_pipeline::executor::compare`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use megamoe_comm::{Communicator, ReduceOp};
use megamoe_model::ffn::FfnParams;
use megamoe_model::{ChunkParams, ChunkSpec, Model, ModelConfig};
use megamoe_optim::{clip_factor, Optimizer, ParamRole, Schedule as LrSchedule};
use megamoe_pipeline::executor::RankTiming;
use megamoe_pipeline::{
    generate, run_rank, sum_shared_gradients, validate, CommSchedule, PipelineShape, Schedule,
};
use megamoe_plan::{Plan, RankCoords, ZeroLevel};
use megamoe_tensor::{DType, Device, Tensor};

use super::pipeline_fsdp::StageShards;
use super::pipeline_reduce::{norm_owner, reduce_over_data_ranks};
use super::pipeline_stage::{ChunkStage, MicroBatch};
use super::pipeline_stats::StageValues;
use super::pipeline_tensors::{visit_chunk_buffers, PipelineTensors, StageTensors};
use super::wire::CommTransport;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::metrics::LossParts;
use crate::trainer::batch_tensors;

/// One pipeline rank of a run: its model stages' parameters and optimizer state.
#[derive(Debug)]
pub struct PipelineRank {
    pub(super) plan: Plan,
    pub(super) model: Model,
    pub(super) schedule: Schedule,
    pub(super) comm_schedule: CommSchedule,
    /// The pipeline rank (`coords.pp`).
    pub(super) rank: usize,
    /// This rank's place in the mesh (dp, ep pick its micro-batches and gradient groups).
    pub(super) coords: RankCoords,
    /// Data ranks dp·ep: each runs M of the step's dp·ep·M micro-batches.
    pub(super) data_replicas: usize,
    /// Layer slice of each model stage.
    pub(super) specs: Vec<ChunkSpec>,
    /// Parameters of the model stages this rank holds, by model stage (the only model
    /// tensors it holds: see [`stage_params`]).
    pub(super) params: BTreeMap<usize, ChunkParams>,
    /// Every model stage's tensors (names, shapes, holders), exchanged at construction.
    pub(super) tensors: PipelineTensors,
    /// Slots of the gradient norm: one per distinct parameter in one rank's order; the
    /// slot of each tensor whose gradient this rank counts (the lowest rank holding it).
    pub(super) norm_slots: usize,
    pub(super) owned_slots: HashMap<String, usize>,
    /// The head reads the embedding (tied head or MTP).
    pub(super) shared_embedding: bool,
    /// Data domains of the run (routing counts are split by domain when several).
    pub(super) num_domains: usize,
    pub(super) optimizer: Optimizer,
    /// `parallel.fsdp` 1/2: the optimizer holds this rank's rows (module `pipeline_fsdp`).
    pub(super) shards: Option<StageShards>,
    pub(super) lr: LrSchedule,
    pub(super) step: u64,
    /// This rank's measured schedule run of every step so far (this process's steps).
    pub(super) timings: Vec<RankTiming>,
}

/// The process groups a pipeline step uses (see [`PipelineRank::step_in`]).
#[derive(Clone, Copy)]
pub struct PipelineGroups<'a> {
    /// Every rank of the run: losses, gradient norm and expert picks are summed over it.
    pub world: &'a dyn Communicator,
    /// This rank's pipeline (`parallel.pp` ranks, same dp and ep coordinates): stage
    /// messages and shared-parameter gradients.
    pub pp: &'a dyn Communicator,
    /// Ranks holding the same dense parameters of the stage (dp·ep).
    pub dense_dp: &'a dyn Communicator,
    /// Ranks holding the same experts of the stage (dp).
    pub expert_dp: &'a dyn Communicator,
    /// Ranks holding slices of the stage's matrices when `parallel.tp > 1` (module
    /// `pipeline_tp`).
    pub tp: Option<&'a dyn Communicator>,
}

/// What one pipeline step did (the same numbers on every rank, except `timing`).
#[derive(Debug, Clone)]
pub struct PipelineStep {
    /// Loss parts averaged over micro-batches.
    pub loss: LossParts,
    /// MTP depth CEs averaged over micro-batches.
    pub mtp_losses: Vec<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// The NaN/Inf guard skipped the update.
    pub skipped: bool,
    /// This rank's measured schedule run.
    pub timing: RankTiming,
    /// Routing statistics of every MoE layer over the step's micro-batches (all ranks).
    pub moe: Vec<crate::metrics::MoeLayerStats>,
    /// GateSkip kept shares per gated layer, averaged over the step's micro-batches.
    pub gate_skip: Vec<crate::metrics::GateSkipStats>,
    /// FlexiDepth kept shares and layers used, averaged over the step's micro-batches.
    pub flexi_depth: Option<crate::metrics::FlexiDepthStats>,
}

/// Calls `f` once per distinct parameter name of `params` (model stages ascending).
pub(super) fn visit_distinct(
    params: &BTreeMap<usize, ChunkParams>,
    f: &mut dyn FnMut(&str, &Tensor, ParamRole),
) {
    let mut seen = HashSet::new();
    for cp in params.values() {
        cp.visit(&mut |n, t, r| {
            if seen.insert(n.to_string()) {
                f(n, t, r);
            }
        });
    }
}

pub(super) fn visit_distinct_mut(
    params: &mut BTreeMap<usize, ChunkParams>,
    f: &mut dyn FnMut(&str, &mut Tensor, ParamRole),
) {
    let mut seen = HashSet::new();
    for cp in params.values_mut() {
        cp.visit_mut(&mut |n, t, r| {
            if seen.insert(n.to_string()) {
                f(n, t, r);
            }
        });
    }
}

/// The parameters pipeline rank `rank` holds under `map`: one [`ChunkParams`] per model
/// stage it computes (`specs[ms]` of `model`), initialised alone by
/// [`Model::init_chunk_params`] (the values one rank draws for those tensors) — never the
/// whole model. Chunks of one rank that both read the embedding (a V schedule's first and
/// head stage with a tied head or MTP) share one tensor.
pub(crate) fn stage_params(
    model: &Model,
    specs: &[ChunkSpec],
    map: &megamoe_plan::StageMap,
    rank: usize,
) -> Result<BTreeMap<usize, ChunkParams>> {
    let mut params = BTreeMap::new();
    for ms in map
        .stages_of(rank)
        .into_iter()
        .filter_map(|s| map.model_stage(s))
    {
        let spec = specs.get(ms).ok_or_else(|| {
            pipeline_config(
                "parallel.schedule",
                format!("model stage {ms}"),
                &format!("the model is cut into {} stages", specs.len()),
            )
        })?;
        if let std::collections::btree_map::Entry::Vacant(e) = params.entry(ms) {
            e.insert(model.init_chunk_params(spec)?);
        }
    }
    share_embedding(&mut params);
    Ok(params)
}

/// Makes every chunk holding the embedding hold the first one's tensor.
pub(super) fn share_embedding(params: &mut BTreeMap<usize, ChunkParams>) {
    let mut first: Option<Tensor> = None;
    for cp in params.values_mut() {
        if let Some(e) = cp.embed_tokens.as_mut() {
            match &first {
                None => first = Some(e.clone()),
                Some(f) => *e = f.clone(),
            }
        }
    }
}

fn pipeline_config(field: &'static str, value: String, rule: &str) -> Error {
    Error::TrainConfig {
        field,
        value,
        rule: rule.to_string(),
    }
}

impl PipelineRank {
    /// The rank of `comm` (a pipeline group of `parallel.pp` ranks) in a run of `plan`
    /// (resolved for `parallel.pp` devices, dp and ep 1): initialises only the model
    /// stages `parallel.schedule` places on this rank (the same values one rank draws
    /// for them) and builds their optimizer. Collective over `comm`.
    pub fn new(plan: &Plan, comm: &dyn Communicator) -> Result<PipelineRank> {
        let par = &plan.parallel;
        if par.dp * par.ep != 1 {
            return Err(pipeline_config(
                "parallel",
                format!("dp={} ep={}", par.dp, par.ep),
                "PipelineRank::new runs parallel.pp alone (dp and ep 1); a Trainer rank \
                 (Trainer::new_rank) runs pp with dp and ep",
            ));
        }
        let coords = RankCoords {
            pp: comm.rank(),
            dp: 0,
            ep: 0,
            cp: 0,
            tp: 0,
        };
        let model = Model::new(ModelConfig::from_plan(plan)?)?;
        PipelineRank::with_model(plan, coords, model, comm)
    }

    /// The pipeline rank at `coords` of `plan`, its stages built from `model` (whose MoE
    /// layers hold the rank's experts when ep > 1). Collective over the pipeline group
    /// `comm` (rank `coords.pp` of `parallel.pp`).
    pub(crate) fn with_model(
        plan: &Plan,
        coords: RankCoords,
        model: Model,
        comm: &dyn Communicator,
    ) -> Result<PipelineRank> {
        crate::support::check_cpu_numerics(plan)?;
        let par = &plan.parallel;
        let rank = coords.pp;
        if par.cp != 1 {
            return Err(pipeline_config(
                "parallel",
                format!("cp={}", par.cp),
                "the pipeline trainer runs parallel.pp with dp, ep and tp (cp must be 1)",
            ));
        }
        if rank >= par.pp || coords.dp >= par.dp || coords.ep >= par.ep {
            return Err(pipeline_config(
                "rank",
                format!("pp {} dp {} ep {}", coords.pp, coords.dp, coords.ep),
                &format!(
                    "must lie inside parallel.pp={} dp={} ep={}",
                    par.pp, par.dp, par.ep
                ),
            ));
        }
        if comm.size() != par.pp || comm.rank() != rank {
            return Err(pipeline_config(
                "pipeline communicator",
                format!("rank {} of {}", comm.rank(), comm.size()),
                &format!("must be rank {rank} of parallel.pp={}", par.pp),
            ));
        }
        let shape = PipelineShape {
            ranks: par.pp,
            microbatches: par.microbatches,
            vpp: par.vpp,
        };
        let schedule = generate(par.schedule, shape)?;
        let comm_schedule = validate(&schedule)?;
        let shared_embedding = model.cfg.tie_embeddings || model.mtp.is_some();
        let map = &schedule.stage_map;
        let specs = ChunkSpec::even(plan.model.n_layers, map.model_stages())?;
        let params = stage_params(&model, &specs, map, rank)?;
        let mut optimizer = Optimizer::new(&plan.optim, &mut |f| visit_distinct(&params, f))?;
        let mine = params
            .iter()
            .map(|(&ms, cp)| (ms, StageTensors::of(cp, &optimizer)))
            .collect();
        // fsdp 1/2/3: the optimizer keeps the rows only (the whole one named the state);
        // with 3 the stage parameters are the rows too (module `pipeline_fsdp`).
        let mut params = params;
        let shards = match par.zero {
            ZeroLevel::Replicated => None,
            zero => {
                let rows_only = zero == ZeroLevel::Parameters;
                let s = StageShards::new(&params, coords, par.dp, par.ep, rows_only)?;
                optimizer = s.optimizer(&plan.optim)?;
                if rows_only {
                    s.install_rows(&mut params);
                }
                Some(s)
            }
        };
        let tensors = PipelineTensors::exchange(comm, map, &mine)?;
        // The lowest rank holding a tensor counts it in the gradient norm, in the slot
        // one rank's visit order gives it.
        let order = tensors.params();
        let norm_slots = order.len();
        let owned_slots = order
            .into_iter()
            .enumerate()
            .filter(|(_, p)| tensors.owner(&p.name) == Some(rank))
            .map(|(i, p)| (p.name, i))
            .collect::<HashMap<_, _>>();
        let lr = LrSchedule::from_plan(&plan.optim, plan.train.steps)?;
        Ok(PipelineRank {
            plan: plan.clone(),
            model,
            schedule,
            comm_schedule,
            rank,
            coords,
            data_replicas: par.dp * par.ep,
            specs,
            params,
            tensors,
            norm_slots,
            owned_slots,
            shared_embedding,
            num_domains: 1,
            optimizer,
            shards,
            lr,
            step: 0,
            timings: Vec::new(),
        })
    }

    /// Splits the routing statistics of each step by data domain over `n` domains (the
    /// data source's; 1 = not split).
    pub fn set_num_domains(&mut self, n: usize) {
        self.num_domains = n.max(1);
    }

    /// The schedule this rank runs a program of.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Steps run so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// This rank's measured schedule run of every step this process ran, in step order
    /// (see [`super::PipelineReport`]).
    pub fn timings(&self) -> &[RankTiming] {
        &self.timings
    }

    /// Every distinct parameter and buffer (expert bias) this rank holds, by global name,
    /// as host f32 values.
    pub fn named_values(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        let mut err = None;
        let mut push = |n: &str, t: &Tensor| {
            if err.is_none() {
                match t.to_host_f32() {
                    Ok(v) => out.push((n.to_string(), v)),
                    Err(e) => err = Some(e),
                }
            }
        };
        visit_distinct(&self.params, &mut |n, t, _| push(n, t));
        for cp in self.params.values() {
            visit_chunk_buffers(cp, &mut |n, t| push(n, t));
        }
        match err {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }

    /// Elements of the distinct parameters this rank holds (its stages' share of the
    /// model; a tensor two of its stages read counts once).
    pub fn param_elements(&self) -> u64 {
        let mut n = 0u64;
        visit_distinct(&self.params, &mut |_, t, _| n += t.numel() as u64);
        n
    }

    /// (name, dims) of the distinct parameters this rank holds, in visit order (under
    /// `parallel.fsdp = 3` its rows).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        visit_distinct(&self.params, &mut |n, t, _| {
            out.push((n.to_string(), t.dims().to_vec()))
        });
        out
    }

    /// Bytes of this rank's parameters, their gradients (f32, allocated per step) and
    /// optimizer state.
    pub(crate) fn state_bytes(&self) -> u64 {
        let (mut params, mut grads, mut state) = (0u64, 0u64, 0u64);
        visit_distinct(&self.params, &mut |n, t, _| {
            params += (t.numel() * t.dtype().size_in_bytes()) as u64;
            // A gradient is whole during the step (fsdp 3: the parameter is rows).
            let grad = match (self.grad_rows(n), t.dims().first()) {
                (Some(full), Some(&rows)) if rows > 0 => t.numel() / rows * full,
                _ => t.numel(),
            };
            grads += (grad * DType::F32.size_in_bytes()) as u64;
        });
        self.optimizer
            .visit_state(&mut |_, t| state += (t.numel() * t.dtype().size_in_bytes()) as u64);
        params + grads + state
    }

    /// Every distinct parameter of the model (every stage's, this rank's shapes), in one
    /// rank's order.
    pub(crate) fn model_params(&self) -> Vec<super::pipeline_tensors::ParamEntry> {
        self.tensors.params()
    }

    /// One optimizer step over `batch` (the whole step's `train.global_batch` sequences,
    /// the same on every rank). `comm` is the pipeline group: `parallel.pp` ranks, this
    /// rank's index in it equal to the pipeline rank. Collective: every rank of the group
    /// calls it with the same batch.
    pub fn step(&mut self, comm: &dyn Communicator, batch: &Batch) -> Result<PipelineStep> {
        self.step_in(
            PipelineGroups {
                world: comm,
                pp: comm,
                dense_dp: comm,
                expert_dp: comm,
                tp: None,
            },
            batch,
        )
    }

    /// [`PipelineRank::step`] of a rank of a pp × dp × ep mesh, over its `groups`.
    /// Collective over the world: every rank calls it with the same batch.
    pub fn step_in(&mut self, groups: PipelineGroups<'_>, batch: &Batch) -> Result<PipelineStep> {
        let comm = groups.pp;
        let pp = self.plan.parallel.pp;
        if comm.size() != pp || comm.rank() != self.rank {
            return Err(pipeline_config(
                "pipeline communicator",
                format!("rank {} of {}", comm.rank(), comm.size()),
                &format!("must be rank {} of parallel.pp={pp}", self.rank),
            ));
        }
        let world_size = groups.world.size();
        let tp = groups.tp.map_or(1, |t| t.size());
        if world_size != pp * self.data_replicas * tp {
            return Err(pipeline_config(
                "pipeline world",
                world_size.to_string(),
                &format!(
                    "must be parallel.pp x dp x ep x tp = {}",
                    pp * self.data_replicas * tp
                ),
            ));
        }
        let s = self.step as usize;
        let m = self.plan.batch.microbatches;
        let mbs = self.plan.batch.micro_batch_size;
        // This data rank's micro-batches of the step's dp·ep·M.
        let first = (self.coords.dp * self.plan.parallel.ep + self.coords.ep) * m;
        let micro = (first..first + m)
            .map(|i| {
                let rows = batch.rows(i * mbs..(i + 1) * mbs)?;
                let (ids, targets) = batch_tensors(&rows, Device::Cpu)?;
                Ok(MicroBatch { ids, targets, rows })
            })
            .collect::<Result<Vec<_>>>()?;

        // 1. The schedule program over this rank's stages (with fsdp 3: the rows, the
        //    tensors outside the blocks gathered for the step).
        let working = self.working_params()?;
        let map = &self.schedule.stage_map;
        let mut stages = BTreeMap::new();
        for st in map.stages_of(self.rank) {
            let ms = map.model_stage(st).unwrap_or(0);
            let chunk = self.model.chunk(self.specs[ms].clone())?;
            let params = working[&ms].clone();
            let mut stage = ChunkStage::new(st, chunk, params, &micro, s, self.shared_embedding)?
                .with_grad_rows(&|n| self.grad_rows(n))?;
            stage.num_domains = self.num_domains;
            stages.insert(st, stage);
        }
        let mut transport = CommTransport::new(comm);
        comm.barrier()?;
        let epoch = Instant::now();
        let timing = run_rank(
            &self.schedule,
            &self.comm_schedule,
            self.rank,
            &mut stages,
            &mut transport,
            epoch,
        )?;
        // 2. Shared and mirrored parameters: every copy gets the total.
        sum_shared_gradients(&self.schedule, self.rank, &mut stages, &mut transport)?;
        let mut losses = BTreeMap::new();
        let mut picks: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        let mut routing: BTreeMap<usize, ([f32; 3], usize)> = BTreeMap::new();
        let mut values = StageValues::default();
        let mut by_domain: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        let mut grads: Vec<(String, Tensor, ParamRole)> = Vec::new();
        let mut seen = HashSet::new();
        for st in stages.into_values() {
            if let Some(e) = st.accumulate_error.take() {
                return Err(e.into());
            }
            losses.extend(st.losses);
            values.extend(st.values);
            for (layer, c) in st.by_domain {
                let sum = by_domain.entry(layer).or_insert_with(|| vec![0.0; c.len()]);
                sum.iter_mut().zip(&c).for_each(|(a, b)| *a += b);
            }
            for (layer, (v, k)) in st.routing {
                let r = routing.entry(layer).or_insert(([0.0; 3], k));
                r.0.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
            for (layer, p) in st.picks {
                let sum = picks.entry(layer).or_insert_with(|| vec![0.0; p.len()]);
                sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
            }
            st.grads.visit(&mut |n, t, r| {
                if seen.insert(n.to_string()) {
                    grads.push((n.to_string(), t.clone(), r));
                }
            });
        }

        // 3. Data parallelism: the stage's gradients over its data ranks (with fsdp
        //    reduce-scattered into this rank's rows).
        match &self.shards {
            Some(sh) => sh.reduce_scatter(&groups, &mut grads, self.data_replicas)?,
            None if self.data_replicas > 1 => {
                reduce_over_data_ranks(groups, &mut grads, self.data_replicas)?
            }
            None => {}
        }

        // Under tp every tp rank computed the same statistics: tp rank 0 reports them.
        if self.repeats_statistics() {
            (picks, routing, values, losses) = Default::default();
        }
        let mut moe = self.gather_routing(groups.world, &picks, &routing, &by_domain)?;
        let layer_stats = self.gather_layer_values(groups.world, first, &values)?;
        for m in &mut moe {
            m.shared_gate_mean = layer_stats.shared_gate.get(&m.layer).copied();
        }

        // 4. Losses of every micro-batch, from the head stages.
        let (loss, mtp_losses) = self.gather_losses(groups.world, first, &losses)?;

        // 5. Global gradient norm and clipping: Σ g² of each tensor in its one-rank slot
        // (filled by the rank owning it, zero elsewhere: the sum over ranks is exact),
        // then summed in one rank's order, as `clip_grad_norm` does.
        let zero = Tensor::zeros([1], DType::F32, Device::Cpu)?;
        let mut parts = vec![zero; self.norm_slots];
        for (n, g, role) in &grads {
            if let Some(&slot) = self.owned_slots.get(n) {
                let owner = self.shards.is_some() || norm_owner(self.coords, *role);
                if owner && self.counts_on_tp_axis(n) {
                    parts[slot] = g.sum_squares()?.reshape([1])?;
                }
            }
        }
        let local = Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)?;
        let norm_t = groups
            .world
            .all_reduce(&local, ReduceOp::Sum)?
            .sum_all()?
            .sqrt()?;
        if let Some(max) = self.plan.optim.grad_clip {
            let factor = clip_factor(&norm_t, max)?;
            for (_, g, _) in &mut grads {
                g.scale_by_assign(&factor)?;
            }
        }
        // SYNC: the norm is a host value for metrics and the NaN/Inf guard.
        let grad_norm = norm_t.to_scalar_f32()? as f64;
        let finite = grad_norm.is_finite() && loss.total.is_finite();

        // 6. Optimizer and expert bias, unless the guard skips the step.
        let lr = self.lr.lr(s);
        if finite {
            match self.shards.as_mut() {
                Some(sh) => sh.step(&groups, &mut self.optimizer, &grads, &mut self.params, lr)?,
                None => match groups.tp {
                    Some(tp) => self.tp_optimizer_step(tp, &grads, lr)?,
                    None => self.optimizer.step(
                        &mut |f| visit_distinct_mut(&mut self.params, f),
                        &mut |f| grads.iter().for_each(|(n, g, r)| f(n, g, *r)),
                        lr,
                    )?,
                },
            }
            self.sync_embedding_copies();
            self.update_expert_bias(groups.world, &picks)?;
        } else {
            log::warn!(
                "step {}: non-finite loss {} or gradient norm {grad_norm}; update skipped",
                s + 1,
                loss.total
            );
        }
        self.step += 1;
        self.timings.push(timing.clone());
        Ok(PipelineStep {
            loss,
            mtp_losses,
            grad_norm,
            lr,
            skipped: !finite,
            timing,
            moe,
            gate_skip: layer_stats.gate_skip,
            flexi_depth: layer_stats.flexi_depth,
        })
    }

    /// After the optimizer stepped the first copy of the embedding on this rank, the
    /// other model stages holding it take the same tensor.
    fn sync_embedding_copies(&mut self) {
        share_embedding(&mut self.params);
    }

    /// Aux-loss-free balancing, as one rank: `b ← b + γ·sign(mean(c) − c)` with `c` the
    /// step's picks per routed expert over every micro-batch (all-reduced: DualPipe's two
    /// copies of a layer see different micro-batches).
    fn update_expert_bias(
        &mut self,
        comm: &dyn Communicator,
        picks: &BTreeMap<usize, Vec<f32>>,
    ) -> Result<()> {
        let Some(moe) = &self.plan.moe else {
            return Ok(());
        };
        let Some(rate) = moe.expert_bias_rate else {
            return Ok(());
        };
        let (layers, e) = (self.plan.model.n_layers, moe.routed_experts);
        let mut table = vec![0.0f32; layers * e];
        for (&l, p) in picks {
            if l < layers && p.len() == e {
                table[l * e..(l + 1) * e].copy_from_slice(p);
            }
        }
        let t = Tensor::from_vec_f32(table, [layers, e], Device::Cpu)?;
        let all = comm.all_reduce(&t, ReduceOp::Sum)?.to_host_f32()?;
        let update = megamoe_moe::ExpertBiasUpdate {
            rate: rate as f32,
            centre: false,
        };
        for cp in self.params.values_mut() {
            let offset = cp.layer_offset;
            for (i, l) in cp.layers.iter_mut().enumerate() {
                let FfnParams::Moe(p) = &mut l.mlp else {
                    continue;
                };
                let Some(bias) = p.router.expert_bias.as_mut() else {
                    continue;
                };
                let layer = offset + i;
                let c = all[layer * e..(layer + 1) * e].to_vec();
                let c = Tensor::from_vec_f32(c, [e], Device::Cpu)?;
                *bias = update.apply(bias, &c)?;
            }
        }
        Ok(())
    }
}
