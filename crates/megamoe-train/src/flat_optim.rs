//! The flat optimizer step of a single-process AdamW run on a GPU: the global gradient
//! norm over every gradient in two launches and AdamW over every parameter in one
//! (megamoe-tensor's [`OptimizerSegments`]), the clip factor folded into the AdamW launch,
//! instead of one reduction, one in-place clip scaling and one AdamW launch per parameter.
//! Bit for bit the per-parameter path (megamoe-tensor documents how); used by the host
//! path of [`Trainer::step`] and inside whole-step CUDA graphs ([`crate::step_graph`]).
//! Other runs (Muon, distributed, bf16 parameters with f32 masters, CPU) keep the
//! per-parameter path; [`Trainer::set_flat_optimizer`] turns it off for comparison.

#[cfg(feature = "cuda")]
use megamoe_tensor::Tensor;

use crate::error::Result;
use crate::trainer::Trainer;

/// Whether the flat step may run (on by default).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FlatOptimizer {
    pub(crate) off: bool,
}

/// A flat step in progress on the host path: the segments and the pre-clip norm (device).
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub(crate) struct FlatStep {
    segments: megamoe_tensor::cuda::OptimizerSegments,
    norm: Tensor,
}

/// (No GPU backend in this build: never made.)
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub(crate) enum FlatStep {}

impl Trainer {
    /// Turns the flat optimizer step on (default) or off (the per-parameter ops; same bits).
    pub fn set_flat_optimizer(&mut self, on: bool) {
        self.flat.off = !on;
    }

    /// The segments of every parameter in the gradients' visit order, or `None` where this
    /// run keeps the per-parameter optimizer (see the module doc).
    #[cfg(feature = "cuda")]
    pub(crate) fn flat_segments(
        &mut self,
        gpu: &megamoe_tensor::cuda::CudaBackend,
    ) -> Result<Option<megamoe_tensor::cuda::OptimizerSegments>> {
        let eligible = !self.flat.off
            && self.parallel.is_none()
            && self.pipeline.is_none()
            && self.plan.optim.kind == megamoe_plan::OptimizerKind::AdamW
            && matches!(self.options.device, megamoe_tensor::Device::Cuda(_));
        if !eligible {
            return Ok(None);
        }
        let mut segs = Vec::new();
        let (params, grads) = (&mut self.params, &self.grads);
        let made = self.optimizer.step_adamw_with(
            &mut |f| params.visit_mut(f),
            &mut |f| grads.grads().visit(f),
            &mut |p, moments, g, decay| {
                segs.push(gpu.adamw_segment(
                    p,
                    &mut moments.exp_avg,
                    &mut moments.exp_avg_sq,
                    g,
                    decay,
                )?);
                Ok(())
            },
        );
        if let Err(e) = made {
            // bf16 masters, a shared buffer, ...: the per-parameter path handles (or
            // reports) it
            log::debug!("flat optimizer off: {e}");
            return Ok(None);
        }
        // The norm sums the gradients in their visit order (the per-parameter path's).
        let mut order = Vec::new();
        grads
            .grads()
            .visit(&mut |_, g, _| order.push(megamoe_tensor::cuda::device_address(g).unwrap_or(0)));
        let mut ordered = Vec::with_capacity(segs.len());
        for a in order {
            match segs.iter().position(|s| s.g == a) {
                Some(i) => ordered.push(segs.swap_remove(i)),
                None => return Ok(None),
            }
        }
        if !segs.is_empty() || ordered.is_empty() {
            return Ok(None);
        }
        Ok(Some(gpu.optimizer_segments(&ordered)?))
    }

    /// Host path, clip half: the pre-clip global norm of a flat step, read once (SYNC), or
    /// `None` (per-parameter path).
    #[cfg(feature = "cuda")]
    pub(crate) fn flat_clip(&mut self) -> Result<Option<(FlatStep, f64)>> {
        let megamoe_tensor::Device::Cuda(ordinal) = self.options.device else {
            return Ok(None);
        };
        megamoe_optim::clip::check_max_norm(self.plan.optim.grad_clip)?;
        let gpu = megamoe_tensor::cuda::cuda_backend(ordinal)?;
        let Some(segments) = self.flat_segments(gpu)? else {
            return Ok(None);
        };
        let norm = gpu.segments_grad_norm(&segments)?;
        // SYNC: the norm is a host value for metrics and the NaN/Inf guard.
        let host = norm.to_scalar_f32()? as f64;
        Ok(Some((FlatStep { segments, norm }, host)))
    }

    /// (No GPU backend: always the per-parameter path.)
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn flat_clip(&mut self) -> Result<Option<(FlatStep, f64)>> {
        Ok(None)
    }

    /// Host path, update half: AdamW at `lr` over every parameter with the clip factor of
    /// the step's norm, then the step is counted.
    #[cfg(feature = "cuda")]
    pub(crate) fn flat_adamw(&mut self, step: FlatStep, lr: f64) -> Result<()> {
        let megamoe_tensor::Device::Cuda(ordinal) = self.options.device else {
            unreachable!("flat_clip makes a FlatStep on a GPU only")
        };
        let gpu = megamoe_tensor::cuda::cuda_backend(ordinal)?;
        let factor = self.flat_clip_factor(&step.norm)?;
        let [with, without] = [true, false].map(|decay| {
            gpu.adamw_device_words(&self.optimizer.next_adamw_step(lr, decay))
                .and_then(|w| Tensor::from_vec_i32(w.to_vec(), [9], self.options.device))
        });
        let (with, without) = (with?, without?);
        gpu.segments_adamw(&step.segments, (&with, &without), factor.as_ref(), None)?;
        self.optimizer.count_step();
        Ok(())
    }

    /// (No GPU backend: never called.)
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn flat_adamw(&mut self, step: FlatStep, _lr: f64) -> Result<()> {
        match step {}
    }

    /// The device clip factor of `norm` (`None` without clipping).
    #[cfg(feature = "cuda")]
    pub(crate) fn flat_clip_factor(&self, norm: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self.plan.optim.grad_clip {
            Some(m) => Some(megamoe_optim::clip_factor(norm, m)?),
            None => None,
        })
    }
}
