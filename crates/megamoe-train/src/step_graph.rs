//! Whole-step CUDA graphs (opt-in in the library, [`Trainer::set_cuda_graph`]; the CLI
//! turns them on for GPU runs): on a GPU run in static-capacity mode the forward and
//! backward of every micro-batch (gradient zeroing, loss parts and statistics included)
//! is captured once, after one uncaptured warm-up step, and replayed in later steps. With
//! [`Trainer::set_cuda_graph_optimizer`] (AdamW) the capture goes on through clipping, the
//! NaN/Inf guard (a device flag), the AdamW update (constants in a device buffer written
//! before each replay; the flat step of [`crate::flat_optim`] where the run allows it)
//! and the expert-bias update, and the host only reads the step's
//! statistics and gradient norm (one read) and counts the step; otherwise the statistics
//! read, clipping, the optimizer and the expert-bias update run after the replay,
//! uncaptured.
//!
//! Correctness rests on three rules:
//! - **Fixed inputs.** The micro-batches' token ids, targets and (with several data
//!   domains) each token's domain live in device buffers made once and overwritten in
//!   place before each replay; the per-domain expert counts are computed from that
//!   buffer on the device. Every other upload inside the captured region (group offsets,
//!   segment ids, index maps) depends only on shapes and reads a pinned copy kept with
//!   the graph.
//! - **Fixed addresses.** The graph reads parameters and buffers and writes gradients at
//!   the addresses it recorded; before each replay the trainer compares every
//!   parameter's, buffer's, gradient's and input's address with those recorded and
//!   captures again when one moved (a copy-on-write of a shared buffer, a loaded
//!   checkpoint); the optimizer and the expert-bias update write in place.
//! - **Nothing per-step inside.** Runs whose captured work would depend on the step or
//!   on the batch's content beyond its tokens run uncaptured and say why: dropless MoE
//!   (host reads of expert counts), GateSkip (per-step budgets), distributed runs, CPU
//!   runs.
//!
//! The status of the last step is `captured`, `captured again (<tensor> moved)`,
//! `replayed` (each with ` (optimizer inside)` when it applies) or `off (reason)`
//! ([`Trainer::cuda_graph_status`]).

use megamoe_tensor::Tensor;

use crate::data::Batch;
use crate::error::Result;
use crate::step_stats::{token_domain_ids, StepStatsAccumulator};
use crate::trainer::{batch_tensors, Trainer};

/// One micro-batch's device inputs: `[B, T]` i32 token ids and targets, and with several
/// data domains each token's domain ([`token_domain_ids`]).
#[derive(Debug, Clone)]
pub(crate) struct MicroInputs {
    ids: Tensor,
    targets: Tensor,
    domains: Option<Tensor>,
}

/// What a step's device work leaves for the host.
#[derive(Debug)]
pub(crate) struct DeviceStep {
    /// Loss parts and statistics (and the gradient norm when `optimizer_done`), unread.
    pub(crate) stats: StepStatsAccumulator,
    /// Clipping, the AdamW update and the expert-bias update ran inside the graph, guarded
    /// on the device by the finiteness of the loss and norm: the host only counts the step.
    pub(crate) optimizer_done: bool,
}

/// The graph state a trainer keeps between steps.
#[derive(Debug, Default)]
pub(crate) struct StepGraphState {
    /// [`Trainer::set_cuda_graph`].
    enabled: bool,
    /// [`Trainer::set_cuda_graph_optimizer`].
    optimizer: bool,
    /// The last step's status.
    status: String,
    /// Fixed input buffers, one set per micro-batch.
    #[cfg(feature = "cuda")]
    inputs: Vec<MicroInputs>,
    /// One uncaptured step ran with the fixed inputs (kernels compiled, caches made).
    #[cfg(feature = "cuda")]
    warmed: bool,
    #[cfg(feature = "cuda")]
    captured: Option<Captured>,
    /// Fixed `[9]` i32 AdamW constants (with, without weight decay) that the captured
    /// optimizer reads; rewritten before each replay.
    #[cfg(feature = "cuda")]
    adamw_consts: Option<[Tensor; 2]>,
    /// The flat optimizer's segment table the captured optimizer reads (`None`: the
    /// per-parameter ops were captured), made before each capture.
    #[cfg(feature = "cuda")]
    segments: Option<megamoe_tensor::cuda::OptimizerSegments>,
}

#[cfg(feature = "cuda")]
#[derive(Debug)]
struct Captured {
    graph: megamoe_tensor::cuda::StepGraph,
    /// The captured step's statistics tensors (rewritten by each replay).
    stats: StepStatsAccumulator,
    /// Name and address of every parameter, buffer, gradient and input at capture.
    addresses: Vec<(String, u64)>,
    /// The bf16 weight copies the captured step read as the optimizer wrote them (not
    /// cast inside the graph): it replays only while they still hold their weights.
    copies: megamoe_tensor::cuda::WrittenCopies,
    /// The optimizer is inside the graph.
    optimizer: bool,
}

impl Trainer {
    /// Turns whole-step CUDA graphs on or off (off by default; see [`crate::step_graph`]
    /// for which runs can use them). Turning it off drops a captured graph.
    pub fn set_cuda_graph(&mut self, on: bool) {
        self.graph = StepGraphState {
            enabled: on,
            optimizer: self.graph.optimizer,
            ..StepGraphState::default()
        };
    }

    /// Also captures gradient clipping, the AdamW update and the expert-bias update in the
    /// whole-step graph (off by default; needs [`Trainer::set_cuda_graph`]): the learning
    /// rate and step count are device words written before each replay and the NaN/Inf
    /// guard is a device flag, so a replay runs the whole step and the host reads only the
    /// step's statistics and norm (one read). AdamW only: Muon runs keep the optimizer
    /// after the replay. Drops a captured graph.
    pub fn set_cuda_graph_optimizer(&mut self, on: bool) {
        self.graph = StepGraphState {
            enabled: self.graph.enabled,
            optimizer: on,
            ..StepGraphState::default()
        };
    }

    /// How the last step ran: `captured`, `captured again (<tensor> moved)`, `replayed`
    /// or `off (reason)`.
    pub fn cuda_graph_status(&self) -> String {
        if self.graph.status.is_empty() {
            "off (disabled)".to_string()
        } else {
            self.graph.status.clone()
        }
    }

    /// Why this run cannot use a whole-step graph (`None`: it can).
    fn graph_blocker(&self) -> Option<&'static str> {
        if !self.graph.enabled {
            return Some("disabled");
        }
        if !cfg!(feature = "cuda")
            || !matches!(self.options.device, megamoe_tensor::Device::Cuda(_))
        {
            return Some("not a GPU run");
        }
        if self.parallel.is_some() || self.pipeline.is_some() {
            return Some("distributed run");
        }
        if let Some(moe) = &self.plan.moe {
            let static_capacity =
                matches!(moe.capacity, megamoe_plan::Capacity::Factor(_)) && moe.pad_to_capacity;
            if !static_capacity {
                return Some("dropless MoE reads expert counts on the host; set moe.capacity_factor and moe.pad_to_capacity = true");
            }
        }
        if self.plan.gate_skip.is_some() {
            return Some("GateSkip budgets change per step");
        }
        None
    }

    /// Why the optimizer of this run stays outside the graph (`None`: it goes inside).
    #[cfg(feature = "cuda")]
    fn graph_optimizer_blocker(&self) -> Option<&'static str> {
        if !self.graph.optimizer {
            return Some("disabled");
        }
        if self.plan.optim.kind == megamoe_plan::OptimizerKind::Muon {
            return Some("Muon");
        }
        None
    }

    /// Zeroes the gradients and runs forward and backward of micro-batches `first..` of
    /// `batch` (the step's device work before its statistics read), captured or
    /// replayed when whole-step graphs are on and this run allows them.
    pub(crate) fn forward_backward(
        &mut self,
        batch: &Batch,
        first: usize,
        s: usize,
    ) -> Result<DeviceStep> {
        let mbs = self.plan.batch.micro_batch_size;
        let m = self.plan.batch.microbatches;
        let micros = (first..first + m)
            .map(|i| batch.rows(i * mbs..(i + 1) * mbs))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if let Some(reason) = self.graph_blocker() {
            let status = format!("off ({reason})");
            if self.graph.enabled && self.graph.status != status {
                log::info!("cuda_graph: {status}");
            }
            self.graph.status = status;
            let inputs = micros
                .iter()
                .map(|mb| self.micro_inputs(mb))
                .collect::<Result<Vec<_>>>()?;
            return Ok(DeviceStep {
                stats: self.run_micro_batches(&inputs, s)?,
                optimizer_done: false,
            });
        }
        self.graph_step(&micros, s)
    }

    /// A micro-batch's inputs, uploaded to the run's device.
    fn micro_inputs(&self, micro: &Batch) -> Result<MicroInputs> {
        let (ids, targets) = batch_tensors(micro, self.options.device)?;
        let domains = if self.num_domains > 1 {
            let d = token_domain_ids(micro, self.num_domains);
            let shape = [micro.batch_size, micro.seq_len];
            Some(Tensor::from_vec_i32(d, shape, self.options.device)?)
        } else {
            None
        };
        Ok(MicroInputs {
            ids,
            targets,
            domains,
        })
    }

    /// The step's device work: zero the gradients (deferred: the first GEMM into each
    /// overwrites it, the rest is zeroed after the backward), then forward and backward of
    /// every micro-batch. Its only uploads depend on shapes, so it can be captured. The weights
    /// are registered for bf16 copies meanwhile (each f32 weight cast at most once, none
    /// where the flat AdamW launch of the previous step wrote its copy), released before
    /// an optimizer that updates them in place.
    fn run_micro_batches(
        &mut self,
        inputs: &[MicroInputs],
        s: usize,
    ) -> Result<StepStatsAccumulator> {
        let _weights =
            megamoe_tensor::WeightCopies::begin(self.options.device, &self.param_handles())?;
        // Lazily: each gradient's first GEMM overwrites it; settled after the backward.
        self.grads.zero_deferred()?;
        let mut stats = StepStatsAccumulator::new(self.num_domains);
        let grad_scale = 1.0 / self.plan.batch.microbatches as f32;
        let params = crate::distributed::working_params(self.parallel.as_ref(), &self.params)?;
        for (i, input) in inputs.iter().enumerate() {
            if i + 1 == inputs.len() {
                // The last micro-batch completes each gradient: reduce it during backward.
                if let Some(par) = &self.parallel {
                    par.arm_overlap();
                }
            }
            let out = self.model.forward(&params, &input.ids, &input.targets, s)?;
            stats.add(&out.losses, &out.stats, input.domains.as_ref())?;
            self.model
                .backward(&params, out.saved, self.grads.grads_mut(), grad_scale)?;
        }
        // The gradients nothing wrote are zeroed now (the reduce, clip and optimizer read).
        self.grads.settle()?;
        Ok(stats)
    }

    #[cfg(not(feature = "cuda"))]
    fn graph_step(&mut self, _micros: &[Batch], _s: usize) -> Result<DeviceStep> {
        unreachable!("graph_blocker refuses every run of a build without feature cuda")
    }

    #[cfg(feature = "cuda")]
    fn graph_step(&mut self, micros: &[Batch], s: usize) -> Result<DeviceStep> {
        let megamoe_tensor::Device::Cuda(ordinal) = self.options.device else {
            unreachable!("graph_blocker refuses CPU runs")
        };
        let gpu = megamoe_tensor::cuda::cuda_backend(ordinal)?;
        // Fixed inputs: made on the first graph step, overwritten in place afterwards.
        if self.graph.inputs.len() != micros.len() {
            self.graph.inputs = micros
                .iter()
                .map(|mb| self.micro_inputs(mb))
                .collect::<Result<Vec<_>>>()?;
        } else {
            for (input, mb) in self.graph.inputs.iter().zip(micros) {
                gpu.overwrite_i32(&input.ids, &mb.inputs)?;
                gpu.overwrite_i32(&input.targets, &mb.targets)?;
                if let Some(domains) = &input.domains {
                    gpu.overwrite_i32(domains, &token_domain_ids(mb, self.num_domains))?;
                }
            }
        }
        let inputs = self.graph.inputs.clone();
        let addresses = self.graph_addresses();
        // Why the graph is captured again (`None`: first capture).
        let mut moved = None;
        // A stale graph (a buffer moved) is dropped before capturing again.
        if let Some(c) = self.graph.captured.take() {
            let stale =
                !c.copies.is_empty() && !gpu.written_copies_hold(&c.copies, &self.param_handles());
            let changed = match first_moved(&c.addresses, &addresses) {
                None if stale => Some("a weight's bf16 copy (weight written)".to_string()),
                other => other,
            };
            match changed {
                None => {
                    if c.optimizer {
                        self.write_adamw_consts(gpu, s)?;
                    }
                    gpu.replay(&c.graph)?;
                    self.graph.status = status("replayed", c.optimizer);
                    let step = DeviceStep {
                        stats: c.stats.clone(),
                        optimizer_done: c.optimizer,
                    };
                    self.graph.captured = Some(c);
                    return Ok(step);
                }
                Some(name) => moved = Some(name),
            }
        }
        if !self.graph.warmed {
            let stats = self.run_micro_batches(&inputs, s)?;
            self.graph.warmed = true;
            self.graph.status = "off (warm-up step before capture)".to_string();
            return Ok(DeviceStep {
                stats,
                optimizer_done: false,
            });
        }
        let optimizer = self.graph_optimizer_blocker().is_none();
        if optimizer {
            self.write_adamw_consts(gpu, s)?;
            self.graph.segments = self.flat_segments(gpu)?;
        }
        // The addresses the graph will read, the optimizer's constants and moments included.
        let addresses = self.graph_addresses();
        gpu.begin_capture()?;
        let queued = self.run_micro_batches(&inputs, s).and_then(|mut stats| {
            if optimizer {
                self.optimizer_in_graph(gpu, &mut stats)?;
            }
            Ok(stats)
        });
        let graph = gpu.end_capture();
        let stats = queued?;
        let graph = graph?;
        let copies = gpu.written_weight_copies();
        // Nothing recorded has run yet: this replay is this step's work.
        gpu.replay(&graph)?;
        self.graph.status = match moved {
            None => status("captured", optimizer),
            Some(name) => status(&format!("captured again ({name} moved)"), optimizer),
        };
        // Kept only if the captured step left every buffer where it found it; otherwise
        // the next step captures again (its addresses will not match).
        match first_moved(&addresses, &self.graph_addresses()) {
            None => {
                self.graph.captured = Some(Captured {
                    graph,
                    stats: stats.clone(),
                    addresses,
                    copies,
                    optimizer,
                })
            }
            Some(name) => log::warn!(
                "step {}: the captured step moved {name}; capturing again next step",
                s + 1
            ),
        }
        Ok(DeviceStep {
            stats,
            optimizer_done: optimizer,
        })
    }

    /// Writes this step's AdamW constants (learning rate of step `s`, bias corrections of
    /// the optimizer's next step) into the fixed buffers the captured optimizer reads.
    #[cfg(feature = "cuda")]
    fn write_adamw_consts(
        &mut self,
        gpu: &megamoe_tensor::cuda::CudaBackend,
        s: usize,
    ) -> Result<()> {
        let lr = self.schedule.lr(s);
        let words = [true, false]
            .map(|decay| gpu.adamw_device_words(&self.optimizer.next_adamw_step(lr, decay)));
        let [with, without] = words;
        let (with, without) = (with?, without?);
        match &self.graph.adamw_consts {
            Some([a, b]) => {
                gpu.overwrite_i32(a, &with)?;
                gpu.overwrite_i32(b, &without)?;
            }
            None => {
                let device = self.options.device;
                self.graph.adamw_consts = Some([
                    Tensor::from_vec_i32(with.to_vec(), [9], device)?,
                    Tensor::from_vec_i32(without.to_vec(), [9], device)?,
                ]);
            }
        }
        Ok(())
    }

    /// The step's work after its backward, queued inside the capture: clipping (the norm
    /// goes into `stats`' one read), the go-ahead flag (norm and every micro-batch's loss
    /// finite), AdamW with the constants of [`Trainer::write_adamw_consts`], and the
    /// expert-bias update from the step's device counts; a step whose flag is 0 leaves
    /// parameters, moments and biases untouched, as the host's guard does. The same ops,
    /// in the same order, as the host path of [`Trainer::step`].
    #[cfg(feature = "cuda")]
    fn optimizer_in_graph(
        &mut self,
        gpu: &megamoe_tensor::cuda::CudaBackend,
        stats: &mut StepStatsAccumulator,
    ) -> Result<()> {
        use megamoe_tensor::DType;
        // The flat step: norm and factor first, the gradients stay unscaled (the factor is
        // applied inside the AdamW launch below).
        let (norm, factor) = match &self.graph.segments {
            Some(segs) => {
                megamoe_optim::clip::check_max_norm(self.plan.optim.grad_clip)?;
                let norm = gpu.segments_grad_norm(segs)?;
                let factor = self.flat_clip_factor(&norm)?;
                (norm, factor)
            }
            None => (
                megamoe_optim::clip_grad_norm_tensor(
                    &mut |f| self.grads.grads_mut().visit_mut(f),
                    self.plan.optim.grad_clip,
                )?,
                None,
            ),
        };
        // 1 where finite: x − x is 0 for finite x and NaN for ±∞ and NaN.
        let finite = |t: &Tensor| -> Result<Tensor> { Ok(t.sub(t)?.eq_scalar(0.0)?.reshape([1])?) };
        let mut apply = finite(&norm)?;
        for total in stats.totals()? {
            apply = apply.mul(&finite(&total)?)?;
        }
        stats.set_grad_norm(norm);
        let Some([with, without]) = &self.graph.adamw_consts else {
            unreachable!("write_adamw_consts runs before the capture")
        };
        if let Some(segs) = &self.graph.segments {
            gpu.segments_adamw(segs, (with, without), factor.as_ref(), Some(&apply))?;
        } else {
            let (params, grads) = (&mut self.params, &self.grads);
            self.optimizer.step_adamw_with(
                &mut |f| params.visit_mut(f),
                &mut |f| grads.grads().visit(f),
                &mut |p, moments, g, decay| {
                    let consts = if decay { with } else { without };
                    Ok(gpu.adamw_step_device(
                        p,
                        &mut moments.exp_avg,
                        &mut moments.exp_avg_sq,
                        g,
                        consts,
                        &apply,
                    )?)
                },
            )?;
        }
        let Some(rate) = self.plan.moe.as_ref().and_then(|m| m.expert_bias_rate) else {
            return Ok(());
        };
        let update = megamoe_moe::ExpertBiasUpdate {
            rate: rate as f32,
            centre: false,
        };
        for (layer, picks) in stats.layer_picks()? {
            for (l, moe) in self.params.moe_layers_mut() {
                let Some(bias) = moe.router.expert_bias.as_mut().filter(|_| l == layer) else {
                    continue;
                };
                let next = update.apply(bias, &picks)?;
                let go = Tensor::ones(bias.dims(), DType::F32, bias.device())?.scale_by(&apply)?;
                let kept = go.where_cond(&next, bias)?;
                bias.copy_from(&kept)?;
            }
        }
        Ok(())
    }

    /// Name and device address of every parameter, buffer, gradient and fixed input, in a
    /// fixed order.
    #[cfg(feature = "cuda")]
    fn graph_addresses(&self) -> Vec<(String, u64)> {
        use megamoe_tensor::cuda::device_address;
        let mut out = Vec::new();
        let mut push = |name: String, t: &Tensor| out.push((name, device_address(t).unwrap_or(0)));
        self.params.visit(&mut |n, t, _| push(n.to_string(), t));
        self.params
            .visit_buffers(&mut |n, t| push(n.to_string(), t));
        self.grads
            .grads()
            .visit(&mut |n, t, _| push(format!("the gradient of {n}"), t));
        if self.graph.optimizer {
            self.optimizer
                .visit_state(&mut |n, t| push(format!("optimizer state {n}"), t));
            for t in self.graph.adamw_consts.iter().flatten() {
                push("the AdamW constants".to_string(), t);
            }
            if let Some(segs) = &self.graph.segments {
                push("the optimizer segments".to_string(), segs.device_table());
            }
        }
        for (i, input) in self.graph.inputs.iter().enumerate() {
            push(format!("micro-batch {i}'s ids"), &input.ids);
            push(format!("micro-batch {i}'s targets"), &input.targets);
            if let Some(domains) = &input.domains {
                push(format!("micro-batch {i}'s domains"), domains);
            }
        }
        out
    }
}

/// A status word, marked when the optimizer ran inside the graph.
#[cfg(feature = "cuda")]
fn status(what: &str, optimizer: bool) -> String {
    if optimizer {
        format!("{what} (optimizer inside)")
    } else {
        what.to_string()
    }
}

/// The name of the first tensor whose address differs between two
/// [`Trainer::graph_addresses`] lists (`None`: all the same).
#[cfg(feature = "cuda")]
fn first_moved(captured: &[(String, u64)], now: &[(String, u64)]) -> Option<String> {
    if captured.len() != now.len() {
        return Some("the set of tensors".to_string());
    }
    captured
        .iter()
        .zip(now)
        .find(|(a, b)| a != b)
        .map(|(_, b)| b.0.clone())
}
