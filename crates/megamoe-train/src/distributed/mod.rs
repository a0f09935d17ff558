//! Distributed training: one [`Trainer`] per rank, each holding its shard of the model
//! and running its share of the global batch, joined by the collectives of a
//! [`Communicator`] (thread ranks in one process for `megamoe train --world N`).
//!
//! # What a rank does in one step
//! ```text
//! batch                       every rank reads the same global batch (same data position)
//! micro-batches               data rank d = dp_rank·ep + ep_rank runs micro-batches
//!                             d·m .. (d+1)·m (m = parallel.microbatches per rank, the
//!                             same micro-batch size as one rank running dp·ep·m of them)
//! forward / backward          grad_scale = 1/m; MoE tokens reach their experts by
//!                             all-to-all over the EP group (experts sharded over E)
//! grad reduce                 each block's gradients started during the last
//!                             micro-batch's backward as soon as they are complete
//!                             (module `overlap`), the rest per gradient bucket: dense
//!                             parameters summed over the dense data-parallel group (dp·ep
//!                             ranks), expert banks over the expert data-parallel group
//!                             (dp ranks), in rank order, then scaled by 1/(dp·ep)
//! loss and routing sums       gathered over the data ranks and summed in rank order (f64)
//! clip                        global norm: replicated gradients counted once, the expert
//!                             shards' squares summed over the EP group
//! optimizer, expert bias      every rank on its own shard; replicated parameters stay
//!                             bit-identical because their inputs are
//! ```
//! Per-micro-batch quantities (CE mean, aux, z, capacity) are those of one rank running the
//! same micro-batch, so a layout computes the same step as one rank up to summation order
//! (the layout-invariance tests, `tests/layouts.rs`).
//!
//! # Layouts
//! Runs: `parallel.dp`, `parallel.ep` and `parallel.tp` (any product equal to the world
//! size; tensor parallelism in module `tp`), with `parallel.fsdp` 0, 1/2 (optimizer state
//! and gradients sharded, AdamW or distributed Muon, module `fsdp`) or 3 (parameters
//! sharded between steps too, gathered per layer around its forward and backward, module
//! `zero3`); and `parallel.pp` (every schedule; see [`pipeline`]) alone or times dp and
//! ep: each pipeline stage then runs its data rank's micro-batches, exchanges MoE tokens
//! over the stage's EP group and reduces its gradients over the stage's data-parallel
//! groups, with `fsdp` 1/2/3 its optimizer state and gradients (3: and parameters,
//! gathered per block inside the schedule) sharded over them (module
//! `pipeline_fsdp`), or with `tp` its matrices split over its tp ranks (module
//! `pipeline_tp`). `tp` combines with dp, ep and `fsdp` 1/2/3 (FSDP rows of each TP
//! slice). Refused with a named error ([`check_layout`]): `cp` > 1 and `tp` with `sp`.
//!
//! # Hooks
//! [`Parallel`] is what [`Trainer::step`] consults: [`Parallel::data_rank`] picks the
//! micro-batches, [`Parallel::reduce_step`] and [`Parallel::clip_grad_norm`] replace the
//! single-process gradient path. A pipeline stage runner plugs in at the same place: it
//! replaces the micro-batch loop by its schedule over the stage's chunks, and keeps the
//! reduce / clip / optimizer tail.
//!
//! # Pipeline parallelism
//! [`pipeline`]: [`PipelineRank`] runs one pipeline rank's share of a step under any
//! generated schedule (model chunks as executor stages, messages as [`Wire`]s over a
//! [`Communicator`] through [`CommTransport`]), with its own optimizer over its stages.

mod checkpoint;
mod fsdp;
mod overlap;
pub mod pipeline;
mod pipeline_checkpoint;
mod pipeline_forward;
mod pipeline_fsdp;
mod pipeline_reduce;
mod pipeline_report;
mod pipeline_stage;
mod pipeline_stats;
mod pipeline_tensors;
mod pipeline_tp;
mod pipeline_trainer;
mod reduce;
mod run;
mod tp;
pub mod wire;
mod zero3;

use std::sync::Arc;

use megamoe_comm::Communicator;
use megamoe_model::{Model, ModelParams};
use megamoe_moe::ExpertParallelDispatcher;
use megamoe_plan::{Mesh, MeshGroup, Plan, RankCoords, RawConfig, ZeroLevel};

use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::trainer::{Trainer, TrainerOptions};

pub use pipeline::{PipelineGroups, PipelineRank, PipelineStep};
pub use pipeline_report::{PipelineRankTime, PipelineReport};
pub use pipeline_stage::StageContractError;
pub(crate) use pipeline_trainer::StepStart;
pub use run::{
    check_rank_fault, follow_training, rank_fault_from_env, run_thread_ranks, RANK_FAULT_ENV,
};
pub use wire::{CommTransport, Wire, WireError};
pub(crate) use zero3::working_params;

/// One rank's place in the mesh and its process groups, built once.
pub struct Parallel {
    mesh: Mesh,
    coords: RankCoords,
    world: Box<dyn Communicator>,
    /// Ranks holding the same dense parameters: dp·ep.
    dense_dp: Arc<dyn Communicator>,
    /// Ranks holding the same experts: dp.
    expert_dp: Arc<dyn Communicator>,
    /// Ranks sharing the experts of a layer by all-to-all: ep.
    ep: Arc<dyn Communicator>,
    /// Ranks of this rank's pipeline (same dp and ep coordinates): pp.
    pp: Box<dyn Communicator>,
    /// Ranks holding slices of the same dense matrices: tp (module `tp`).
    tp: Arc<dyn Communicator>,
    /// `parallel.sp` with tp > 1: the residual stream sharded along T (module `tp`).
    sequence_parallel: bool,
    /// This rank's rows of the parameters and gradients (`parallel.fsdp` 1 or 2).
    pub(crate) sharded: Option<fsdp::ShardedState>,
    /// Parameters stay sharded between steps (`parallel.fsdp = 3`, module `zero3`).
    rows_only: bool,
    /// The backward-overlapped gradient reduce (`parallel.fsdp = 0` without `pp`, module
    /// `overlap`).
    overlap: Option<Arc<overlap::GradOverlap>>,
    /// An injected fault (see [`RANK_FAULT_ENV`]): this rank fails before this step.
    fault_step: Option<u64>,
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parallel")
            .field("rank", &self.world.rank())
            .field("mesh", &self.mesh)
            .field("coords", &self.coords)
            .finish()
    }
}

impl Parallel {
    /// Builds this rank's groups from the plan's mesh (collective over `world`, whose size
    /// must be the mesh's world size).
    pub fn new(world: Box<dyn Communicator>, plan: &Plan) -> Result<Parallel> {
        let mesh = plan.mesh;
        let rank = world.rank();
        let coords = mesh.coords(rank).ok_or_else(|| Error::TrainConfig {
            field: "--world",
            value: world.size().to_string(),
            rule: format!("must equal the layout's world size {}", mesh.describe()),
        })?;
        if world.size() != mesh.world() {
            return Err(Error::TrainConfig {
                field: "--world",
                value: world.size().to_string(),
                rule: format!("must equal the layout's world size {}", mesh.describe()),
            });
        }
        let members = |kind| mesh.group_members(rank, kind).unwrap_or_default();
        let dense_dp: Arc<dyn Communicator> = Arc::from(world.split(&members(MeshGroup::DenseDp))?);
        let expert_dp: Arc<dyn Communicator> =
            Arc::from(world.split(&members(MeshGroup::ExpertDp))?);
        let ep: Arc<dyn Communicator> = Arc::from(world.split(&members(MeshGroup::Ep))?);
        let pp = world.split(&members(MeshGroup::Pp))?;
        let tp: Arc<dyn Communicator> = Arc::from(world.split(&members(MeshGroup::Tp))?);
        Ok(Parallel {
            mesh,
            coords,
            world,
            dense_dp,
            expert_dp,
            ep,
            pp,
            tp,
            sequence_parallel: plan.parallel.sp && mesh.tp > 1,
            sharded: None,
            rows_only: false,
            overlap: None,
            fault_step: None,
        })
    }

    /// This rank's world rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// The mesh.
    pub fn mesh(&self) -> Mesh {
        self.mesh
    }

    /// This rank's coordinates.
    pub fn coords(&self) -> RankCoords {
        self.coords
    }

    /// Index of this rank's data stream, `dp_rank·ep + ep_rank` in `0..dp·ep`.
    pub fn data_rank(&self) -> usize {
        self.coords.dp * self.mesh.ep + self.coords.ep
    }

    /// Distinct data streams: dp·ep.
    pub fn data_replicas(&self) -> usize {
        self.mesh.data_replicas()
    }

    /// The world communicator.
    pub fn world(&self) -> &dyn Communicator {
        self.world.as_ref()
    }

    /// The process groups of a pipeline step on this rank.
    pub(crate) fn pipeline_groups(&self) -> pipeline::PipelineGroups<'_> {
        pipeline::PipelineGroups {
            world: self.world.as_ref(),
            pp: self.pp.as_ref(),
            dense_dp: self.dense_dp.as_ref(),
            expert_dp: self.expert_dp.as_ref(),
            tp: (self.mesh.tp > 1).then_some(self.tp.as_ref()),
        }
    }

    /// Arms an injected fault (see [`RANK_FAULT_ENV`]): when `fault` names this rank,
    /// its [`Trainer::step`] fails with [`Error::InjectedRankFault`] before that step.
    pub(crate) fn set_fault(&mut self, fault: Option<(usize, u64)>) {
        self.fault_step = fault.and_then(|(r, s)| (r == self.rank()).then_some(s));
    }

    /// Fails with [`Error::InjectedRankFault`] if the armed fault is at step `next`.
    pub(crate) fn check_fault(&self, next: u64) -> Result<()> {
        match self.fault_step {
            Some(s) if s == next => Err(Error::InjectedRankFault {
                rank: self.rank(),
                step: next,
            }),
            _ => Ok(()),
        }
    }

    /// With `parallel.fsdp` 1, 2 or 3, keeps this rank's rows of `params` for the
    /// optimizer (with 3, copies: the full parameters are then dropped).
    pub(crate) fn init_sharding(&mut self, plan: &Plan, params: &ModelParams) -> Result<()> {
        if plan.parallel.pp > 1 {
            return Ok(()); // a pipeline rank shards its stages itself (`pipeline_fsdp`)
        }
        self.rows_only = plan.parallel.zero == ZeroLevel::Parameters;
        if plan.parallel.zero != ZeroLevel::Replicated {
            self.sharded = Some(self.shard_state(params, self.rows_only)?);
        } else if plan.parallel.pp == 1 {
            let o = overlap::GradOverlap::new(self.dense_dp.clone(), self.expert_dp.clone());
            self.overlap = Some(Arc::new(o));
        }
        Ok(())
    }

    /// The parameters the optimizer updates: this rank's rows when sharded.
    pub(crate) fn optimizer_params(&self) -> Option<&ModelParams> {
        self.sharded.as_ref().map(|s| &s.params)
    }

    /// Cuts `model` to this rank's shard: with ep > 1 every MoE layer keeps experts
    /// `[ep_rank·E/ep, (ep_rank+1)·E/ep)` and exchanges tokens over the EP group.
    /// With tp > 1 every block keeps this rank's heads and FFN hidden units (module `tp`).
    pub(crate) fn shard_model(&self, model: &mut Model) -> Result<()> {
        if self.mesh.ep > 1 {
            if let Some(moe) = &model.cfg.moe {
                let d = ExpertParallelDispatcher::new(self.ep.clone(), moe.routed_experts)?;
                model.set_moe_dispatcher(Arc::new(d))?;
            }
        }
        self.shard_model_tp(model)
    }
}

/// Refuses layouts the distributed trainer cannot run yet, naming the key.
pub fn check_layout(plan: &Plan) -> Result<()> {
    let p = &plan.parallel;
    let refuse = |field: &'static str, value: String, rule: &str| {
        Err(Error::TrainConfig {
            field,
            value,
            rule: rule.to_string(),
        })
    };
    if p.pp > 1 && p.cp > 1 {
        return refuse(
            "parallel.pp",
            p.pp.to_string(),
            "pipeline-parallel training combines with parallel.dp, parallel.ep, parallel.tp \
             and parallel.fsdp: with parallel.pp > 1 set parallel.cp to 1",
        );
    }
    tp::check_tp_layout(plan)?;
    if p.cp > 1 {
        return refuse(
            "parallel.cp",
            p.cp.to_string(),
            "context-parallel training is not implemented; the trainer runs parallel.dp and \
             parallel.ep (set parallel.cp = 1)",
        );
    }
    Ok(())
}

impl Trainer {
    /// A fresh run at step 0 on one rank of a distributed run: resolves `raw` for
    /// `world.size()` ranks, refuses layouts [`check_layout`] cannot run, builds this
    /// rank's groups and its shard of the model (every rank calls this, collectively).
    pub fn new_rank(
        raw: &RawConfig,
        data: Arc<DataSource>,
        options: TrainerOptions,
        world: Box<dyn Communicator>,
    ) -> Result<Trainer> {
        let plan = Plan::resolve(raw, Some(world.size()))?;
        check_layout(&plan)?;
        let par = Parallel::new(world, &plan)?;
        let pipelined = plan.parallel.pp > 1;
        let mut trainer = Trainer::from_plan(plan, raw, data, options, Some(par))?;
        if pipelined {
            trainer.attach_pipeline()?;
        }
        Ok(trainer)
    }

    /// This rank's place in a distributed run (`None` for one process).
    pub fn parallel(&self) -> Option<&Parallel> {
        self.parallel.as_ref()
    }

    /// Whether this process writes the run's files: rank 0, or the only process.
    pub fn is_writer(&self) -> bool {
        self.parallel.as_ref().is_none_or(|p| p.rank() == 0)
    }
}
