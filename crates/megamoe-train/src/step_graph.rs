//! Whole-step CUDA graphs (opt-in, [`Trainer::set_cuda_graph`]): on a GPU run in
//! static-capacity mode the forward and backward of every micro-batch (gradient zeroing,
//! loss parts and statistics included) is captured once, after one uncaptured warm-up
//! step, and replayed in later steps; the step's one batched statistics read, gradient
//! clipping, the optimizer and the expert-bias update run after the replay, uncaptured.
//!
//! Correctness rests on three rules:
//! - **Fixed inputs.** The micro-batches' token ids and targets live in device buffers
//!   made once and overwritten in place before each replay; every other upload inside
//!   the captured region (group offsets, segment ids, index maps) depends only on shapes
//!   and reads a pinned copy kept with the graph.
//! - **Fixed addresses.** The graph reads parameters and buffers and writes gradients at
//!   the addresses it recorded; before each replay the trainer compares every
//!   parameter's, buffer's, gradient's and input's address with those recorded and
//!   captures again when one moved (a copy-on-write, a replaced expert bias, a loaded
//!   checkpoint).
//! - **Nothing per-step inside.** Runs whose captured work would depend on the step or
//!   on the batch's content beyond its tokens run uncaptured and say why: dropless MoE
//!   (host reads of expert counts), GateSkip (per-step budgets), several data domains
//!   (per-batch domain uploads), distributed runs, CPU runs.
//!
//! The status of the last step is `captured`, `replayed` or `off (reason)`
//! ([`Trainer::cuda_graph_status`]).

use megamoe_tensor::Tensor;

use crate::data::Batch;
use crate::error::Result;
use crate::step_stats::StepStatsAccumulator;
use crate::trainer::{batch_tensors, Trainer};

/// The graph state a trainer keeps between steps.
#[derive(Debug, Default)]
pub(crate) struct StepGraphState {
    /// [`Trainer::set_cuda_graph`].
    enabled: bool,
    /// The last step's status.
    status: String,
    /// Fixed `(ids, targets)` device buffers, one pair per micro-batch.
    #[cfg(feature = "cuda")]
    inputs: Vec<(Tensor, Tensor)>,
    /// One uncaptured step ran with the fixed inputs (kernels compiled, caches made).
    #[cfg(feature = "cuda")]
    warmed: bool,
    #[cfg(feature = "cuda")]
    captured: Option<Captured>,
}

#[cfg(feature = "cuda")]
#[derive(Debug)]
struct Captured {
    graph: megamoe_tensor::cuda::StepGraph,
    /// The captured step's statistics tensors (rewritten by each replay).
    stats: StepStatsAccumulator,
    /// Addresses of every parameter, buffer, gradient and input at capture.
    addresses: Vec<u64>,
}

impl Trainer {
    /// Turns whole-step CUDA graphs on or off (off by default; see [`crate::step_graph`]
    /// for which runs can use them). Turning it off drops a captured graph.
    pub fn set_cuda_graph(&mut self, on: bool) {
        self.graph = StepGraphState {
            enabled: on,
            ..StepGraphState::default()
        };
    }

    /// How the last step ran: `captured`, `replayed` or `off (reason)`.
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
        if self.num_domains > 1 {
            return Some("several data domains: per-batch domain uploads");
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
    ) -> Result<StepStatsAccumulator> {
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
                .map(|mb| batch_tensors(mb, self.options.device))
                .collect::<Result<Vec<_>>>()?;
            return self.run_micro_batches(&inputs, &micros, s);
        }
        self.graph_step(&micros, s)
    }

    /// The uncaptured device work of a step.
    fn run_micro_batches(
        &mut self,
        inputs: &[(Tensor, Tensor)],
        micros: &[Batch],
        s: usize,
    ) -> Result<StepStatsAccumulator> {
        self.grads.zero()?;
        let mut stats = StepStatsAccumulator::new(self.num_domains);
        let grad_scale = 1.0 / self.plan.batch.microbatches as f32;
        let params = crate::distributed::working_params(self.parallel.as_ref(), &self.params)?;
        for (i, ((ids, targets), micro)) in inputs.iter().zip(micros).enumerate() {
            if i + 1 == inputs.len() {
                // The last micro-batch completes each gradient: reduce it during backward.
                if let Some(par) = &self.parallel {
                    par.arm_overlap();
                }
            }
            let out = self.model.forward(&params, ids, targets, s)?;
            stats.add(&out.losses, &out.stats, micro)?;
            self.model
                .backward(&params, out.saved, self.grads.grads_mut(), grad_scale)?;
        }
        Ok(stats)
    }

    #[cfg(not(feature = "cuda"))]
    fn graph_step(&mut self, _micros: &[Batch], _s: usize) -> Result<StepStatsAccumulator> {
        unreachable!("graph_blocker refuses every run of a build without feature cuda")
    }

    #[cfg(feature = "cuda")]
    fn graph_step(&mut self, micros: &[Batch], s: usize) -> Result<StepStatsAccumulator> {
        let megamoe_tensor::Device::Cuda(ordinal) = self.options.device else {
            unreachable!("graph_blocker refuses CPU runs")
        };
        let gpu = megamoe_tensor::cuda::cuda_backend(ordinal)?;
        // Fixed inputs: made on the first graph step, overwritten in place afterwards.
        if self.graph.inputs.len() != micros.len() {
            self.graph.inputs = micros
                .iter()
                .map(|mb| batch_tensors(mb, self.options.device))
                .collect::<Result<Vec<_>>>()?;
        } else {
            for ((ids, targets), mb) in self.graph.inputs.iter().zip(micros) {
                gpu.overwrite_i32(ids, &mb.inputs)?;
                gpu.overwrite_i32(targets, &mb.targets)?;
            }
        }
        let inputs = self.graph.inputs.clone();
        let addresses = self.graph_addresses();
        if let Some(c) = &self.graph.captured {
            if c.addresses == addresses {
                gpu.replay(&c.graph)?;
                self.graph.status = "replayed".to_string();
                return Ok(c.stats.clone());
            }
        }
        // A stale graph (a buffer moved) is dropped before capturing again.
        self.graph.captured = None;
        if !self.graph.warmed {
            let stats = self.run_micro_batches(&inputs, micros, s)?;
            self.graph.warmed = true;
            self.graph.status = "off (warm-up step before capture)".to_string();
            return Ok(stats);
        }
        gpu.begin_capture()?;
        let queued = self.run_micro_batches(&inputs, micros, s);
        let graph = gpu.end_capture();
        let stats = queued?;
        let graph = graph?;
        // Nothing recorded has run yet: this replay is this step's work.
        gpu.replay(&graph)?;
        self.graph.status = "captured".to_string();
        // Kept only if the captured step left every buffer where it found it; otherwise
        // the next step captures again (its addresses will not match).
        if self.graph_addresses() == addresses {
            self.graph.captured = Some(Captured {
                graph,
                stats: stats.clone(),
                addresses,
            });
        } else {
            log::warn!(
                "step {}: the captured step moved a parameter or gradient buffer; capturing again next step",
                s + 1
            );
        }
        Ok(stats)
    }

    /// Device addresses of every parameter, buffer, gradient and fixed input, in a fixed
    /// order.
    #[cfg(feature = "cuda")]
    fn graph_addresses(&self) -> Vec<u64> {
        use megamoe_tensor::cuda::device_address;
        let mut out = Vec::new();
        let mut push = |t: &Tensor| out.push(device_address(t).unwrap_or(0));
        self.params.visit(&mut |_, t, _| push(t));
        self.params.visit_buffers(&mut |_, t| push(t));
        self.grads.grads().visit(&mut |_, t, _| push(t));
        for (ids, targets) in &self.graph.inputs {
            push(ids);
            push(targets);
        }
        out
    }
}
