//! A [`Trainer`] on one rank of a pipeline-parallel run (`megamoe train --world N` with
//! `parallel.pp > 1`): [`Trainer::step`] hands the step to the rank's [`PipelineRank`]
//! (the schedule over its stages, its optimizer). The trainer's whole-model replica —
//! parameters, expert biases, optimizer state — is refreshed from the pipeline's stages
//! ([`PipelineRank::replicate_into`]) only when something reads it: evaluation,
//! sampling and checkpoints ([`Trainer::sync_pipeline_replica`], collective over the
//! pipeline, at the same points on every rank), not after every step. The replica is
//! still held on every rank (stage-only memory is the library's, not yet the CLI's).

use std::time::Instant;

use megamoe_model::{Model, ModelConfig};
use megamoe_plan::OptimizerKind;

use super::pipeline::PipelineRank;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::goodput::TimeCategory;
use crate::metrics::{mfu, StepMetrics};
use crate::trainer::Trainer;

/// What [`Trainer::step`] measured before handing over.
pub(crate) struct StepStart {
    pub started: Instant,
    pub compute_started: Instant,
    pub state_bytes: u64,
    pub reads_before: u64,
}

impl Trainer {
    /// Makes this rank a pipeline rank (`parallel.pp > 1`) at its mesh coordinates; with
    /// ep > 1 its stages' MoE layers hold the rank's experts and exchange tokens over the
    /// stage's EP group.
    pub(crate) fn attach_pipeline(&mut self) -> Result<()> {
        let par = self.parallel.as_ref().ok_or_else(|| Error::TrainConfig {
            field: "parallel.pp",
            value: self.plan.parallel.pp.to_string(),
            rule: "a pipeline rank needs its place in a distributed run".into(),
        })?;
        let mut model = Model::new(ModelConfig::from_plan(&self.plan)?)?;
        par.shard_model(&mut model)?;
        self.pipeline = Some(PipelineRank::with_model(&self.plan, par.coords(), model)?);
        Ok(())
    }

    /// This rank's pipeline stages (`None` unless `parallel.pp > 1`).
    pub fn pipeline(&self) -> Option<&PipelineRank> {
        self.pipeline.as_ref()
    }

    /// Refreshes the whole-model replica (parameters, expert biases, optimizer state) from
    /// the pipeline's stages if a step ran since the last refresh. Collective over the
    /// pipeline group; a no-op off the pipeline.
    pub(crate) fn sync_pipeline_replica(&mut self) -> Result<()> {
        let (Some(rank), Some(par)) = (self.pipeline.as_mut(), self.parallel.as_ref()) else {
            return Ok(());
        };
        if rank.replica_step() != Some(rank.step_count()) {
            let pp = par.pipeline_groups().pp;
            rank.replicate_into(pp, &mut self.params, &mut self.optimizer)?;
            rank.set_replica_step(rank.step_count());
        }
        Ok(())
    }

    /// [`Trainer::step`] of a pipeline rank, after the batch was read.
    pub(crate) fn pipeline_step(&mut self, batch: &Batch, at: StepStart) -> Result<StepMetrics> {
        let missing = || Error::TrainConfig {
            field: "parallel.pp",
            value: self.plan.parallel.pp.to_string(),
            rule: "a pipeline step needs the rank's pipeline stages and communicator".into(),
        };
        let mut rank = self.pipeline.take().ok_or_else(missing)?;
        let result = match self.parallel.as_ref() {
            Some(par) => rank.step_in(par.pipeline_groups(), batch),
            None => Err(missing()),
        };
        self.pipeline = Some(rank);
        let out = result?;
        let s = self.step as usize;
        if out.skipped {
            self.nonfinite_streak += 1;
        } else {
            self.nonfinite_streak = 0;
        }
        self.step += 1;
        self.goodput
            .record(TimeCategory::Step, at.compute_started.elapsed());
        let step_time_s = at.started.elapsed().as_secs_f64();
        let tokens = batch.num_tokens() as u64;
        let tokens_per_s = tokens as f64 / step_time_s.max(1e-9);
        let peak = megamoe_tensor::peak_bytes();
        Ok(StepMetrics {
            step: self.step,
            loss: out.loss,
            grad_norm: out.grad_norm,
            lr: out.lr,
            skipped: out.skipped,
            tokens,
            step_time_s,
            tokens_per_s,
            mfu: self
                .options
                .peak_flops
                .map(|p| mfu(self.counts.flops_per_token, tokens_per_s, p)),
            memory_bytes: Some(peak),
            state_bytes: at.state_bytes,
            activation_bytes: peak.saturating_sub(at.state_bytes),
            // Routing statistics gathered over the ranks holding the layers; GateSkip /
            // FlexiDepth statistics and shared-gate means are not gathered yet.
            moe: out.moe,
            gate_skip: Vec::new(),
            flexi_depth: None,
            mtp_losses: out.mtp_losses,
            gpu_pool: None,
            flops_per_s: self.counts.flops_per_token * tokens_per_s,
            muon_lr: match self.plan.optim.kind {
                OptimizerKind::Muon => self.schedule.muon_lr(s),
                _ => None,
            },
            host_reads: megamoe_tensor::host_reads() - at.reads_before,
        })
    }
}
