//! A [`Trainer`] on one rank of a pipeline-parallel run (`megamoe train --world N` with
//! `parallel.pp > 1`): the rank's [`PipelineRank`] holds its stages' parameters, expert
//! biases and optimizer state — and nothing else of the model: the trainer's own
//! parameter set, gradient buffers and optimizer are empty. [`Trainer::step`] hands the
//! step to the pipeline (the schedule over its stages, its optimizer); evaluation and
//! sampling run a forward-only pass over the stages (module `pipeline_forward`), and
//! checkpoints are gathered from the stages on rank 0 (module `pipeline_checkpoint`).

use std::time::Instant;

use megamoe_optim::ParamRole;
use megamoe_plan::OptimizerKind;

use super::pipeline::PipelineRank;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::goodput::TimeCategory;
use crate::metrics::{mfu, StepMetrics};
use crate::trainer::{counts_of, Trainer};

/// What [`Trainer::step`] measured before handing over.
pub(crate) struct StepStart {
    pub started: Instant,
    pub compute_started: Instant,
    pub state_bytes: u64,
    pub reads_before: u64,
    pub parked_before: u64,
}

impl Trainer {
    /// Makes this rank a pipeline rank (`parallel.pp > 1`) at its mesh coordinates; with
    /// ep > 1 its stages' MoE layers hold the rank's experts and exchange tokens over the
    /// stage's EP group. Collective over the rank's pipeline group.
    pub(crate) fn attach_pipeline(&mut self) -> Result<()> {
        let par = self.parallel.as_ref().ok_or_else(|| Error::TrainConfig {
            field: "parallel.pp",
            value: self.plan.parallel.pp.to_string(),
            rule: "a pipeline rank needs its place in a distributed run".into(),
        })?;
        // The trainer's model is already cut to the rank's experts (no weights in it).
        let rank = PipelineRank::with_model(
            &self.plan,
            par.coords(),
            self.model.clone(),
            par.pipeline_groups().pp,
        )?;
        let sizes: Vec<(u64, ParamRole)> = rank
            .model_params()
            .iter()
            .map(|p| (p.dims.iter().product::<usize>() as u64, p.role))
            .collect();
        self.counts = counts_of(&self.plan, &sizes, rank.state_bytes());
        let mut rank = rank;
        rank.set_num_domains(self.num_domains);
        rank.attach_row_gather(par.dense_dp.clone(), par.expert_dp.clone());
        self.pipeline = Some(rank);
        Ok(())
    }

    /// This rank's pipeline stages (`None` unless `parallel.pp > 1`).
    pub fn pipeline(&self) -> Option<&PipelineRank> {
        self.pipeline.as_ref()
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
            // Gathered over the ranks holding the layers (module `pipeline_stats`).
            moe: out.moe,
            gate_skip: out.gate_skip,
            flexi_depth: out.flexi_depth,
            mtp_losses: out.mtp_losses,
            gpu_pool: None,
            flops_per_s: self.counts.flops_per_token * tokens_per_s,
            muon_lr: match self.plan.optim.kind {
                OptimizerKind::Muon => self.schedule.muon_lr(s),
                _ => None,
            },
            host_reads: megamoe_tensor::host_reads() - at.reads_before,
            offload_bytes: megamoe_tensor::parked_bytes() - at.parked_before,
        })
    }
}
