//! The training loop of one process: [`Trainer`] owns the parameters, the optimizer
//! state and the data order, and [`Trainer::step`] is one optimizer step.
//!
//! A step reads top to bottom, like llm.c's `main` loop:
//!
//! ```text
//! batch (B = train.global_batch sequences, booked to Data)
//! grads.zero_deferred()           one flat buffer (GradBuffers), zeroed lazily in place:
//!                                  each gradient's first GEMM overwrites it
//! for each of the M micro-batches (rows of the batch):       grad accumulation
//!     forward → loss parts + stats + saved activations
//!     backward(grad_scale = 1/M)  → grads += ∂(total/M)/∂θ    every loss weight once
//! grads.settle()                   zeroes the gradients nothing wrote
//! grad reduce                      (one process: nothing to reduce)
//! clip_grad_norm                   → pre-clip global norm
//! NaN/Inf guard                    non-finite loss or norm: skip the update
//! lr = schedule.lr(step)           warmup + cosine over train.steps
//! optimizer.step                   AdamW / Muon
//! expert-bias update               MoE layers with moe.expert_bias, from this step's counts
//! metrics                          → StepMetrics (the caller logs one line)
//! ```
//!
//! There are no hooks or callbacks: the caller ([`crate::session::run_training`]) writes the metrics
//! line, shows progress, evaluates and checkpoints between steps.
//!
//! **Aux-loss scaling, exactly once.** `Model::backward` differentiates
//! `grad_scale · total`, where `total` already holds every auxiliary loss with its
//! weight; the trainer passes `grad_scale = 1/M` and nothing else, so each micro-batch
//! contributes its mean loss once and the step's gradient is that of the mean over
//! the `M` micro-batches.
//!
//! **Determinism.** The data order is a pure function of `(seed, sequences consumed)`,
//! every op is deterministic for a given thread count, and a checkpoint holds the
//! exact f32 parameters, optimizer moments, expert-bias buffers, step and data
//! position, so a resumed run repeats the losses of an uninterrupted one bit for bit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use megamoe_model::{GradBuffers, Model, ModelConfig, ModelParams};
use megamoe_optim::ParamRole;
use megamoe_optim::{clip_grad_norm, ClipReport, Optimizer, Schedule};
use megamoe_plan::{OptimizerKind, Plan, RawConfig};
use megamoe_tensor::{DType, Device, Tensor};

use crate::checkpoint::{
    load_checkpoint, save_checkpoint, Checkpoint, Expected, NamedTensor, TensorSpec, TrainState,
};
use crate::data::{Batch, BatchConfig, Batcher, DataSource};
use crate::error::{Error, Result};
use crate::goodput::{GoodputTotals, GoodputTracker, TimeCategory};
use crate::metrics::{mfu, training_flops_per_token, StepMetrics};
use crate::step_stats::StepSums;

/// Gradient bucket size (elements): 4 MiB of f32, the unit a data-parallel reduction will
/// work on.
const GRAD_BUCKET_ELEMS: usize = 1 << 20;

/// Key of the NaN-guard streak in [`TrainState::extra`].
const EXTRA_NONFINITE_STREAK: &str = "nonfinite_streak";

/// Settings of a [`Trainer`] that are not part of the run config.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrainerOptions {
    /// Peak FLOP/s of the machine, for MFU; `None` reports achieved FLOP/s only.
    /// The trainer measures nothing itself: the number comes from the user.
    pub peak_flops: Option<f64>,
    /// Where parameters, gradients, optimizer state and batches live (`Cpu` by default;
    /// `Cuda(i)` needs a build with feature `cuda`). The same model code runs on either.
    pub device: Device,
}

/// Sizes of the model the metrics need, computed once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelCounts {
    /// Trained parameters.
    pub params: u64,
    /// Parameters a token goes through: everything except routed experts, plus
    /// `top_k / routed_experts` of each routed-expert bank.
    pub active_params: u64,
    /// Training FLOPs per token, `6·N + 6·L·H·T` (`N`: the active parameters without the
    /// embedding lookup; see [`training_flops_per_token`]).
    pub flops_per_token: f64,
    /// Bytes of parameters + gradients + optimizer state (on a pipeline rank: of its
    /// stages, the only ones it holds).
    pub state_bytes: u64,
}

/// One process's training run: parameters, optimizer state, data order and step.
#[derive(Debug)]
pub struct Trainer {
    pub(crate) plan: Plan,
    pub(crate) config_toml: String,
    pub(crate) model: Model,
    pub(crate) params: ModelParams,
    /// Gradients: allocated once, zeroed in place at the start of each step.
    pub(crate) grads: GradBuffers,
    pub(crate) optimizer: Optimizer,
    pub(crate) schedule: Schedule,
    pub(crate) batcher: Batcher,
    pub(crate) goodput: GoodputTracker,
    pub(crate) counts: ModelCounts,
    pub(crate) options: TrainerOptions,
    /// Optimizer steps run so far (skipped ones included); the next step is `step + 1`.
    pub(crate) step: u64,
    /// Consecutive steps the NaN/Inf guard skipped.
    pub(crate) nonfinite_streak: usize,
    /// State of the sampling RNG (only `generate` draws from it).
    pub(crate) sample_rng: u64,
    /// Held-out batches grouped by domain, built on the first eval.
    pub(crate) heldout: Option<Vec<Batch>>,
    /// Data domains (expert load is split by domain when there are several).
    pub(crate) num_domains: usize,
    /// This rank's place in a distributed run (`None`: one process holds everything).
    pub(crate) parallel: Option<crate::distributed::Parallel>,
    /// This rank's pipeline stages when `parallel.pp > 1` (the step runs the schedule).
    pub(crate) pipeline: Option<crate::distributed::PipelineRank>,
    /// Whole-step CUDA graph state (see [`crate::step_graph`]).
    pub(crate) graph: crate::step_graph::StepGraphState,
    /// The flat optimizer step's switch (see [`crate::flat_optim`]).
    pub(crate) flat: crate::flat_optim::FlatOptimizer,
}

impl Trainer {
    /// A fresh run at step 0: resolves `raw` for one device, builds the model with
    /// initial parameters and the optimizer, and reads `data` from position 0.
    pub fn new(raw: &RawConfig, data: Arc<DataSource>, options: TrainerOptions) -> Result<Self> {
        let plan = Plan::resolve(raw, None)?;
        crate::support::check_trainer_support(&plan, options.device)?;
        Trainer::from_plan(plan, raw, data, options, None)
    }

    /// [`Trainer::new`] for a resolved `plan`; with `parallel`, this rank's shard of it
    /// (see [`crate::distributed`]).
    pub(crate) fn from_plan(
        plan: Plan,
        raw: &RawConfig,
        data: Arc<DataSource>,
        options: TrainerOptions,
        parallel: Option<crate::distributed::Parallel>,
    ) -> Result<Self> {
        crate::support::check_numerics(&plan, options.device)?;
        let config_toml = toml::to_string(raw).map_err(|e| Error::ConfigToml {
            reason: e.to_string(),
        })?;
        let vocab = data.tokenizer().vocab_size();
        if vocab > plan.model.vocab_size {
            return Err(Error::TrainConfig {
                field: "model.vocab_size",
                value: plan.model.vocab_size.to_string(),
                rule: format!(
                    "must be at least the {} tokenizer's vocabulary of {vocab}",
                    data.tokenizer().name()
                ),
            });
        }
        let mut model = Model::new(ModelConfig::from_plan(&plan)?)?;
        if let Some(par) = &parallel {
            par.shard_model(&mut model)?;
        }
        // A pipeline rank holds only its stages (built by `attach_pipeline`): no
        // whole-model parameters, gradients or optimizer state here.
        let pipelined = plan.parallel.pp > 1;
        let mut params = if pipelined {
            empty_params()?
        } else {
            model.init_params()?
        };
        move_params(&mut params, options.device)?;
        let mut parallel = parallel;
        if let Some(par) = parallel.as_mut() {
            par.init_sharding(&plan, &params)?;
            if let Some(hook) = par.grad_overlap() {
                model.set_grad_ready(Some(hook));
            }
        }
        // The optimizer holds state for this rank's rows when they are sharded.
        let mut optimizer = match parallel.as_ref().and_then(|p| p.optimizer_params()) {
            Some(rows) => Optimizer::new(&plan.optim, &mut |f| rows.visit(f))?,
            None if pipelined => Optimizer::new(&plan.optim, &mut |_| {})?,
            None => Optimizer::new(&plan.optim, &mut |f| params.visit(f))?,
        };
        // One flat buffer each for the gradients and the two moment kinds (same order).
        if !pipelined {
            optimizer.flatten_state()?;
        }
        let grads = GradBuffers::new(&params, GRAD_BUCKET_ELEMS)?;
        if let Some(par) = &parallel {
            par.attach_grad_buffer(&grads);
        }
        let counts = model_counts(&plan, &params, &optimizer);
        // `parallel.fsdp = 3`: keep only this rank's rows; the model gathers each block's.
        if let Some(par) = parallel.as_ref().filter(|p| p.holds_rows_only()) {
            if let (Some(rows), Some(gather)) = (par.optimizer_params(), par.row_gatherer()) {
                params = rows.clone();
                model.set_block_gather(Arc::new(gather));
            }
        }
        let schedule = Schedule::from_plan(&plan.optim, plan.train.steps)?;
        let batcher = Batcher::new(
            data,
            BatchConfig {
                batch_size: plan.batch.global_batch,
                seq_len: plan.model.seq_len,
                seed: plan.train.seed,
            },
        )?;
        let num_domains = batcher.source().domain_names().len();
        Ok(Trainer {
            sample_rng: plan.train.seed,
            plan,
            config_toml,
            model,
            params,
            grads,
            optimizer,
            schedule,
            batcher,
            goodput: GoodputTracker::new(),
            counts,
            options,
            step: 0,
            nonfinite_streak: 0,
            heldout: None,
            num_domains,
            parallel,
            pipeline: None,
            graph: Default::default(),
            flat: Default::default(),
        })
    }

    /// Arms a fault injected into a distributed run (see
    /// [`RANK_FAULT_ENV`](crate::distributed::RANK_FAULT_ENV)): when `fault` = (rank, step)
    /// names this trainer's rank, [`Trainer::step`] fails with
    /// [`Error::InjectedRankFault`] before that step. No effect on a one-process trainer.
    pub fn set_rank_fault(&mut self, fault: Option<(usize, u64)>) {
        if let Some(par) = self.parallel.as_mut() {
            par.set_fault(fault);
        }
    }

    /// The resolved plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The config as TOML text (what checkpoints store and `config.toml` holds).
    pub fn config_toml(&self) -> &str {
        &self.config_toml
    }

    /// Where parameters, gradients and batches live.
    pub fn device(&self) -> Device {
        self.options.device
    }

    /// What `train.dtype` means on this trainer's device, in words
    /// ([`crate::support::numerics`]).
    pub fn numerics(&self) -> &'static str {
        crate::support::numerics(&self.plan, self.options.device)
    }

    /// Steps run so far (the next step is `step() + 1`).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Consecutive steps the NaN/Inf guard has skipped.
    pub fn nonfinite_streak(&self) -> usize {
        self.nonfinite_streak
    }

    /// Model sizes used by the metrics.
    pub fn counts(&self) -> ModelCounts {
        self.counts
    }

    /// The model's parameters (under `parallel.fsdp = 3`, this rank's dim-0 rows of each;
    /// on a pipeline rank an empty set: its stages' are in [`Trainer::pipeline`]).
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// Mutable parameters (tests inject faults through this).
    pub fn params_mut(&mut self) -> &mut ModelParams {
        &mut self.params
    }

    /// The data source.
    pub fn data(&self) -> &Arc<DataSource> {
        self.batcher.source()
    }

    /// Time accounting so far.
    pub fn goodput(&self) -> GoodputTotals {
        self.goodput.totals()
    }

    /// The NaN/Inf guard's verdict: `Err` once more than `train.max_nonfinite_steps`
    /// consecutive steps were non-finite.
    pub fn check_guard(&self) -> Result<()> {
        let limit = self.plan.train.max_nonfinite_steps;
        if self.nonfinite_streak > limit {
            return Err(Error::NonFiniteSteps {
                step: self.step,
                streak: self.nonfinite_streak,
                limit,
            });
        }
        Ok(())
    }

    /// One optimizer step (see the module doc). A non-finite loss or gradient norm
    /// leaves parameters, optimizer state and expert biases unchanged and returns
    /// metrics with `skipped = true`; call [`Trainer::check_guard`] afterwards.
    pub fn step(&mut self) -> Result<StepMetrics> {
        if let Some(par) = &self.parallel {
            par.check_fault(self.step + 1)?;
        }
        let started = Instant::now();
        let reads_before = megamoe_tensor::host_reads();
        let parked_before = megamoe_tensor::parked_bytes();
        // Tensor bytes alive before the step: parameters, optimizer state and
        // other persistent buffers. The peak over the step minus these is what
        // the step itself held at its worst (activations, gradients, temporaries).
        let state_bytes = megamoe_tensor::live_bytes();
        megamoe_tensor::reset_peak_bytes();
        crate::gpu_pool::reset_peak(self.options.device)?;
        let s = self.step as usize; // 0-based index of this step
        let m = self.plan.batch.microbatches;

        // 1. batch
        let batch = self
            .goodput
            .time(TimeCategory::Data, || self.batcher.next_batch())?;
        let compute_started = Instant::now();
        if self.pipeline.is_some() {
            let at = crate::distributed::StepStart {
                started,
                compute_started,
                state_bytes,
                reads_before,
                parked_before,
            };
            return self.pipeline_step(&batch, at);
        }

        // 2. forward / backward per micro-batch; gradients accumulate. A data-parallel
        //    rank runs its own m micro-batches of the global batch.
        //    With whole-step CUDA graphs on, this part is captured once and replayed.
        let first = self.parallel.as_ref().map_or(0, |p| p.data_rank() * m);
        //    With the optimizer in the graph too, steps 4-6 below ran there.
        //    bf16 GEMMs cast each f32 weight at most once (step_graph.rs, weight copies).
        let device = self.forward_backward(&batch, first, s)?;

        // One host read for every micro-batch's loss parts and statistics.
        let mut sums = device.stats.finish(&self.plan)?;

        // 3. grad reduce: a single process holds the whole batch; nothing to reduce.
        //    Distributed: gradients, loss sums and routing counts over the data ranks.
        // 4. clip (returns the pre-clip norm; leaves non-finite gradients untouched).
        //    A single-process AdamW run on a GPU clips and steps every parameter at once.
        let flat = match &self.parallel {
            None if !device.optimizer_done => self.flat_clip()?,
            _ => None,
        };
        let clip = match &mut self.parallel {
            _ if device.optimizer_done => ClipReport::from_norm(
                sums.grad_norm.unwrap_or(f64::NAN),
                self.plan.optim.grad_clip,
            ),
            None if flat.is_some() => ClipReport::from_norm(
                flat.as_ref().map_or(f64::NAN, |f| f.1),
                self.plan.optim.grad_clip,
            ),
            None => clip_grad_norm(
                &mut |f| self.grads.grads_mut().visit_mut(f),
                self.plan.optim.grad_clip,
            )?,
            Some(par) => {
                par.reduce_step(&mut self.grads, &mut sums)?;
                par.clip_grad_norm(&mut self.grads, self.plan.optim.grad_clip)?
            }
        };
        let loss = sums.mean_loss();
        let finite = clip.finite && loss.total.is_finite();

        // 5. lr and optimizer, 6. expert-bias update, unless the guard skips the step.
        let lr = self.schedule.lr(s);
        if finite && device.optimizer_done {
            // The graph's AdamW and expert-bias update ran under the same guard.
            self.optimizer.count_step();
            self.nonfinite_streak = 0;
        } else if finite {
            match &mut self.parallel {
                None if flat.is_some() => {
                    if let Some((step, _)) = flat {
                        self.flat_adamw(step, lr)?;
                    }
                }
                Some(par) if par.is_sharded() => {
                    par.sharded_optimizer_step(&mut self.optimizer, &mut self.params, lr)?
                }
                Some(par) if par.mesh().tp > 1 => {
                    par.tp_optimizer_step(&mut self.optimizer, &mut self.params, &self.grads, lr)?
                }
                _ => self.optimizer.step(
                    &mut |f| self.params.visit_mut(f),
                    &mut |f| self.grads.grads().visit(f),
                    lr,
                )?,
            }
            self.update_expert_bias(&sums)?;
            self.nonfinite_streak = 0;
        } else {
            self.nonfinite_streak += 1;
            log::warn!(
                "step {}: non-finite loss {} or gradient norm {}; update skipped",
                s + 1,
                loss.total,
                clip.norm
            );
        }
        self.step += 1;
        self.goodput
            .record(TimeCategory::Step, compute_started.elapsed());

        // 7. metrics
        let step_time_s = started.elapsed().as_secs_f64();
        let tokens = (batch.num_tokens()) as u64;
        let tokens_per_s = tokens as f64 / step_time_s.max(1e-9);
        Ok(StepMetrics {
            step: self.step,
            loss,
            grad_norm: clip.norm,
            lr,
            skipped: !finite,
            tokens,
            step_time_s,
            tokens_per_s,
            mfu: self
                .options
                .peak_flops
                .map(|p| mfu(self.counts.flops_per_token, tokens_per_s, p)),
            memory_bytes: Some(megamoe_tensor::peak_bytes()),
            gpu_pool: crate::gpu_pool::bytes(self.options.device)?,
            state_bytes,
            activation_bytes: megamoe_tensor::peak_bytes().saturating_sub(state_bytes),
            moe: sums.moe_stats(),
            gate_skip: sums.gate_skip_stats(),
            flexi_depth: sums.flexi_depth_stats(self.plan.model.n_layers),
            mtp_losses: sums.mean_mtp(),
            flops_per_s: self.counts.flops_per_token * tokens_per_s,
            muon_lr: match self.plan.optim.kind {
                OptimizerKind::Muon => self.schedule.muon_lr(s),
                _ => None,
            },
            host_reads: megamoe_tensor::host_reads() - reads_before,
            offload_bytes: megamoe_tensor::parked_bytes() - parked_before,
        })
    }

    /// Handles on every parameter (for [`megamoe_tensor::WeightCopies`]).
    pub(crate) fn param_handles(&self) -> Vec<Tensor> {
        let mut handles = Vec::new();
        self.params.visit(&mut |_, t, _| handles.push(t.clone()));
        handles
    }

    /// Aux-loss-free balancing: `b ← b + γ·sign(mean(c) − c)` per MoE layer with an
    /// expert bias, `c` the step's real picks per routed expert (all micro-batches).
    fn update_expert_bias(&mut self, sums: &StepSums) -> Result<()> {
        let Some(rate) = self.plan.moe.as_ref().and_then(|m| m.expert_bias_rate) else {
            return Ok(());
        };
        let update = megamoe_moe::ExpertBiasUpdate {
            rate: rate as f32,
            centre: false,
        };
        for (&layer, counts) in &sums.moe {
            let c: Vec<f32> = counts.picks.iter().map(|&x| x as f32).collect();
            let c = Tensor::from_vec_f32(c, [counts.picks.len()], self.options.device)?;
            update_layer_bias(&mut self.params, layer, &update, &c)?;
        }
        Ok(())
    }

    /// Model tensors for a checkpoint: every parameter, then the buffers (expert bias).
    /// Collective under `parallel.fsdp = 3` (the rows are gathered).
    pub(crate) fn model_tensors(&self) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::new();
        let mut err = None;
        let gathered;
        let params = match self.parallel.as_ref().filter(|p| p.holds_rows_only()) {
            Some(p) => {
                gathered = p.gather_all(&self.params)?;
                &gathered
            }
            None => &self.params,
        };
        params.visit(&mut |name, t, _| {
            if err.is_none() {
                match NamedTensor::from_tensor(name, t) {
                    Ok(nt) => out.push(nt),
                    Err(e) => err = Some(e),
                }
            }
        });
        visit_buffers(params, &mut |name, t| {
            if err.is_none() {
                match NamedTensor::from_tensor(name, t) {
                    Ok(nt) => out.push(nt),
                    Err(e) => err = Some(e),
                }
            }
        });
        err.map_or(Ok(out), Err)
    }

    pub(crate) fn optimizer_tensors(&self) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::new();
        let mut err = None;
        self.optimizer.visit_state(&mut |name, t| {
            if err.is_none() {
                match NamedTensor::from_tensor_keep_bf16(name, t) {
                    Ok(nt) => out.push(nt),
                    Err(e) => err = Some(e),
                }
            }
        });
        err.map_or(Ok(out), Err)
    }

    /// Saves a checkpoint of the current step under `checkpoints_dir` (see
    /// [`save_checkpoint`]); returns its directory. Refuses with
    /// [`Error::NonFiniteParameters`] (writing nothing) if any parameter, buffer or
    /// optimizer value is NaN or infinite.
    pub fn save_checkpoint(&mut self, checkpoints_dir: &Path) -> Result<PathBuf> {
        let started = Instant::now();
        if self.parallel.is_some() {
            // Distributed: every rank writes its pieces, this rank the index (collective,
            // module `distributed::checkpoint`).
            let state = self.checkpoint_state(started);
            let dir = self.save_shards(Some((checkpoints_dir, &state)))?;
            self.goodput
                .record(TimeCategory::Checkpoint, started.elapsed());
            return dir.ok_or_else(|| Error::TrainConfig {
                field: "checkpoint",
                value: checkpoints_dir.display().to_string(),
                rule: "only rank 0 of a distributed run writes the index".into(),
            });
        }
        let model = self.model_tensors()?;
        let optimizer = self.optimizer_tensors()?;
        check_finite(self.step, model.iter().chain(&optimizer))?;
        let state = self.checkpoint_state(started);
        let dir = save_checkpoint(checkpoints_dir, &state, &model, &optimizer)?;
        self.goodput
            .record(TimeCategory::Checkpoint, started.elapsed());
        Ok(dir)
    }

    /// The scalar state a checkpoint of the current step stores (`started`: when the
    /// save began, booked into its goodput totals).
    fn checkpoint_state(&self, started: Instant) -> TrainState {
        let mut extra = BTreeMap::new();
        extra.insert(
            EXTRA_NONFINITE_STREAK.to_string(),
            serde_json::Value::from(self.nonfinite_streak as u64),
        );
        // Book the save before taking the totals it stores, so a resumed run counts it.
        let mut goodput = self.goodput.totals();
        goodput.checkpoint_s += started.elapsed().as_secs_f64();
        TrainState {
            step: self.step,
            rng: vec![self.sample_rng],
            optimizer_steps: match &self.pipeline {
                Some(rank) => rank.optimizer_steps(),
                None => self.optimizer.steps_taken(),
            },
            data: self.batcher.position(),
            config_toml: self.config_toml.clone(),
            goodput,
            extra,
        }
    }

    /// Replaces parameters, buffers, optimizer state, step, data position and goodput
    /// totals with those of the checkpoint `path` refers to (a run directory, its
    /// `checkpoints/` or one checkpoint directory). The checkpoint must have been
    /// written with the same config and model shapes; on any error nothing changes.
    ///
    /// On a rank of a distributed run this is collective: rank 0 reads the one-rank
    /// checkpoint and every rank takes its shard (see [`crate::distributed`]).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        if self.parallel.is_some() {
            return self.load_checkpoint_shard(path);
        }
        let started = Instant::now();
        let model_specs = specs(&self.model_tensors()?);
        let optim_specs = specs(&self.optimizer_tensors()?);
        let ckpt = load_checkpoint(
            path,
            &Expected {
                config_toml: Some(&self.config_toml),
                model: Some(&model_specs),
                optimizer: Some(&optim_specs),
            },
        )?;
        self.apply_checkpoint(&ckpt, started)
    }

    /// Replaces the trainer's state with `ckpt` (tensors in this trainer's shapes);
    /// `started` is when the load began (booked to checkpoint time).
    pub(crate) fn apply_checkpoint(&mut self, ckpt: &Checkpoint, started: Instant) -> Result<()> {
        // Build everything first, then commit, so a failure leaves the trainer as it was.
        let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
        for t in &ckpt.model {
            by_name.insert(t.name.clone(), t.to_tensor(self.options.device)?);
        }
        let mut params = self.params.clone();
        let mut missing = None;
        params.visit_mut(&mut |name, slot, _| match by_name.get(name) {
            Some(t) => *slot = t.clone(),
            None => missing = Some(name.to_string()),
        });
        visit_buffers_mut(&mut params, &mut |name, slot| match by_name.get(name) {
            Some(t) => *slot = t.clone(),
            None => missing = Some(name.to_string()),
        });
        if let Some(name) = missing {
            return Err(Error::CheckpointTensorMissing {
                path: ckpt.dir.join(crate::checkpoint::MODEL_FILE),
                tensor: name,
            });
        }
        let mut optimizer = self.optimizer.clone();
        let mut state = Vec::with_capacity(ckpt.optimizer.len());
        for t in &ckpt.optimizer {
            state.push((t.name.clone(), t.to_tensor(self.options.device)?));
        }
        optimizer.load_state(ckpt.state.optimizer_steps, state)?;
        let mut batcher = Batcher::new(self.batcher.source().clone(), self.batcher.config())?;
        batcher.seek(&ckpt.state.data)?;

        self.params = params;
        self.optimizer = optimizer;
        self.batcher = batcher;
        self.set_train_state(&ckpt.state, started);
        Ok(())
    }

    /// Takes a checkpoint's scalar state (step, data position, sampling RNG, NaN-guard
    /// streak, goodput) without its tensors; `started` is when the load began. On an
    /// error (a data position the source cannot reach) nothing changes.
    pub(crate) fn apply_train_state(&mut self, state: &TrainState, started: Instant) -> Result<()> {
        let mut batcher = Batcher::new(self.batcher.source().clone(), self.batcher.config())?;
        batcher.seek(&state.data)?;
        self.batcher = batcher;
        self.set_train_state(state, started);
        Ok(())
    }

    fn set_train_state(&mut self, state: &TrainState, started: Instant) {
        self.step = state.step;
        self.sample_rng = state.rng.first().copied().unwrap_or(self.plan.train.seed);
        self.nonfinite_streak = state
            .extra
            .get(EXTRA_NONFINITE_STREAK)
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize;
        self.goodput = GoodputTracker::resume(state.goodput);
        self.goodput
            .record(TimeCategory::Checkpoint, started.elapsed());
    }
}

/// Replaces layer `layer`'s expert bias (if it has one) with its updated value.
fn update_layer_bias(
    params: &mut ModelParams,
    layer: usize,
    update: &megamoe_moe::ExpertBiasUpdate,
    counts: &Tensor,
) -> Result<()> {
    for (l, moe) in params.moe_layers_mut() {
        if l != layer {
            continue;
        }
        if let Some(bias) = moe.router.expert_bias.as_mut() {
            // Written in place: the bias keeps its buffer (a captured step graph reads it).
            let next = update.apply(bias, counts)?;
            bias.copy_from(&next)?;
        }
    }
    Ok(())
}

/// Visits the model's non-trained buffers (expert biases) by name.
fn visit_buffers(params: &ModelParams, f: &mut dyn FnMut(&str, &Tensor)) {
    params.visit_buffers(f);
}

/// Mutable twin of [`visit_buffers`].
fn visit_buffers_mut(params: &mut ModelParams, f: &mut dyn FnMut(&str, &mut Tensor)) {
    params.visit_buffers_mut(f);
}

/// `(ids, targets)` as `[B, T]` i32 tensors on `device`.
pub(crate) fn batch_tensors(b: &Batch, device: Device) -> Result<(Tensor, Tensor)> {
    let shape = [b.batch_size, b.seq_len];
    Ok((
        Tensor::from_vec_i32(b.inputs.clone(), shape, device)?,
        Tensor::from_vec_i32(b.targets.clone(), shape, device)?,
    ))
}

/// Moves freshly initialised parameters and buffers to `device` (no-op on the CPU): the
/// initial values are drawn on the host by the named RNG, so every device starts from the
/// same bits.
fn move_params(params: &mut ModelParams, device: Device) -> Result<()> {
    if device == Device::Cpu {
        return Ok(());
    }
    let mut failed = None;
    let mut mv = |t: &mut Tensor| {
        if failed.is_none() {
            match t.to_device(device) {
                Ok(d) => *t = d,
                Err(e) => failed = Some(e),
            }
        }
    };
    params.visit_mut(&mut |_, t, _| mv(t));
    params.visit_buffers_mut(&mut |_, t| mv(t));
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The first non-finite value of `tensors`, as [`Error::NonFiniteParameters`].
pub(crate) fn check_finite<'a>(
    step: u64,
    tensors: impl IntoIterator<Item = &'a NamedTensor>,
) -> Result<()> {
    for t in tensors {
        if let Some(index) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteParameters {
                step,
                tensor: t.name.clone(),
                index,
                value: t.data[index],
            });
        }
    }
    Ok(())
}

fn specs(tensors: &[NamedTensor]) -> Vec<TensorSpec> {
    tensors.iter().map(NamedTensor::spec).collect()
}

/// Parameter counts, FLOPs per token and state bytes of a model.
fn model_counts(plan: &Plan, params: &ModelParams, optimizer: &Optimizer) -> ModelCounts {
    let mut sizes = Vec::new();
    let mut param_bytes = 0u64;
    params.visit(&mut |_, t, role| {
        sizes.push((t.numel() as u64, role));
        param_bytes += (t.numel() * t.dtype().size_in_bytes()) as u64;
    });
    let mut optim_bytes = 0u64;
    optimizer.visit_state(&mut |_, t| {
        optim_bytes += (t.numel() * t.dtype().size_in_bytes()) as u64;
    });
    // Gradients are f32 buffers of every parameter's shape.
    let total: u64 = sizes.iter().map(|s| s.0).sum();
    let grad_bytes = total * DType::F32.size_in_bytes() as u64;
    counts_of(plan, &sizes, param_bytes + grad_bytes + optim_bytes)
}

/// [`ModelCounts`] of a model whose parameters have `sizes` (elements, role), holding
/// `state_bytes` of parameters, gradients and optimizer state.
pub(crate) fn counts_of(plan: &Plan, sizes: &[(u64, ParamRole)], state_bytes: u64) -> ModelCounts {
    let expert_share = plan
        .moe
        .as_ref()
        .map_or(1.0, |m| m.top_k as f64 / m.routed_experts.max(1) as f64);
    let total: u64 = sizes.iter().map(|s| s.0).sum();
    let active: f64 = sizes
        .iter()
        .map(|&(n, role)| match role {
            ParamRole::ExpertBank => n as f64 * expert_share,
            _ => n as f64,
        })
        .sum();
    let m = &plan.model;
    // The embedding table is a lookup, not a matmul (a tied table is the LM head's GEMM).
    let lookup: u64 = if m.tie_embeddings {
        0
    } else {
        sizes
            .iter()
            .filter(|s| s.1 == ParamRole::Embedding)
            .map(|s| s.0)
            .sum()
    };
    ModelCounts {
        params: total,
        active_params: active.round() as u64,
        flops_per_token: training_flops_per_token(
            (active.round() as u64).saturating_sub(lookup),
            m.n_layers,
            m.n_heads * m.head_dim,
            m.seq_len,
        ),
        state_bytes,
    }
}

/// The parameter set of a trainer that holds no model tensors (a pipeline rank keeps its
/// stages in its [`crate::distributed::PipelineRank`]): empty embedding and norm, no layers.
fn empty_params() -> Result<ModelParams> {
    let empty = Tensor::zeros([0], DType::F32, Device::Cpu)?;
    Ok(ModelParams {
        embed_tokens: empty.clone(),
        layers: Vec::new(),
        norm: empty,
        lm_head: None,
        mtp: None,
    })
}

pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
#[path = "trainer_flat_tests.rs"]
mod flat_tests;

#[cfg(test)]
mod counts_tests {
    use super::*;

    /// The tiny config (4 layers, 4 heads × 16, T = 64, top-2 of 8 experts) with `tie`.
    fn tiny_plan(tie: bool) -> Plan {
        let raw = RawConfig::from_toml_str_with_overrides(
            include_str!("../../../configs/tiny.toml"),
            &[format!("model.tie_embeddings={tie}")],
        )
        .unwrap();
        Plan::resolve(&raw, Some(1)).unwrap()
    }

    #[test]
    fn flops_per_token_count_matmul_params_only() {
        let sizes = [
            (1000, ParamRole::Embedding),
            (500, ParamRole::Matrix),
            (800, ParamRole::ExpertBank),
            (1000, ParamRole::Head),
        ];
        // Active: 1000 + 500 + 800 · 2/8 + 1000 = 2700; attention 6 · 4 · 64 · 64 = 98_304.
        let untied = counts_of(&tiny_plan(false), &sizes, 0);
        assert_eq!(untied.active_params, 2700);
        // The untied embedding is a lookup: 6 · (2700 − 1000) + 98_304.
        assert_eq!(untied.flops_per_token, 6.0 * 1700.0 + 98_304.0);
        // A tied table is the head's GEMM (listed once, as the embedding).
        let tied = counts_of(&tiny_plan(true), &sizes[..3], 0);
        assert_eq!(tied.flops_per_token, 6.0 * 1700.0 + 98_304.0);
    }
}
