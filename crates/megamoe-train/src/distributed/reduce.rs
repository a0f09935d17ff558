//! The distributed tail of a step: gradient buckets all-reduced over each parameter's
//! data-parallel group (those the backward already started, module `overlap`, awaited
//! first), the step's loss and routing sums over the data ranks, and the global
//! gradient-norm clip with replicated gradients counted once.

use megamoe_comm::{Communicator, ReduceOp};
use megamoe_model::GradBuffers;
use megamoe_optim::{clip_factor, ClipReport, ParamRole};
use megamoe_tensor::{Device, Tensor};

use super::Parallel;
use crate::error::{Error, Result};
use crate::step_stats::StepSums;

impl Parallel {
    /// Sums gradients and the step's sums over the data ranks (see the module doc).
    pub(crate) fn reduce_step(
        &mut self,
        grads: &mut GradBuffers,
        sums: &mut StepSums,
    ) -> Result<()> {
        if self.is_sharded() {
            self.reduce_scatter_grads(grads)?;
        } else {
            self.reduce_grads(grads)?;
        }
        reduce_sums(self.dense_dp.as_ref(), sums)
    }

    /// Per bucket (in the order backward completes them): the bucket — a contiguous view of
    /// the flat gradient buffer, dense parameters only or expert banks only — summed over
    /// the dense data-parallel group or the expert data-parallel group, rank order, then
    /// × 1/(dp·ep), written back into the same view in place: no gradient is copied on this
    /// side (the in-process transport snapshots the posted view, MPI/NCCL read it). The
    /// all-reduces the backward already started (module `overlap`: runs of adjacent
    /// gradients of a block, each a view) are awaited here too and written back into their
    /// views; a bucket holding some of those gradients reduces each run of its remaining
    /// adjacent slots as one view. All buckets are started before the first is awaited.
    fn reduce_grads(&self, grads: &mut GradBuffers) -> Result<()> {
        let scale = 1.0 / self.data_replicas() as f32;
        let flat = grads.flat().cloned().ok_or(Error::TrainConfig {
            field: "parallel",
            value: "separate gradient buffers".to_string(),
            rule: "the data-parallel reduce needs the flat gradient buffer".to_string(),
        })?;
        let layout = grads.layout();
        let slots = layout.slots();
        // Reduces the backward already started (module `overlap`), as element ranges.
        let index: std::collections::HashMap<&str, usize> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut early = vec![false; slots.len()];
        let mut started = Vec::new();
        for s in self.take_started() {
            for name in &s.names {
                let i = *index.get(name.as_str()).ok_or_else(|| Error::TrainConfig {
                    field: "parallel",
                    value: name.clone(),
                    rule: "a gradient reduced during backward is not in the gradient layout"
                        .to_string(),
                })?;
                early[i] = true;
            }
            started.push((s.elems, s.handle));
        }
        // The rest, in bucket order: a whole bucket as its view, else each run of its
        // remaining adjacent slots (per group) as a view.
        for (b, bucket) in layout.buckets().iter().enumerate() {
            let group = |expert: bool| -> &dyn Communicator {
                if expert {
                    self.expert_dp.as_ref()
                } else {
                    self.dense_dp.as_ref()
                }
            };
            if !bucket.slots.clone().any(|i| early[i]) {
                let expert = slots[bucket.slots.start].role == ParamRole::ExpertBank;
                let view = grads.bucket(b)?;
                let handle = group(expert).start_all_reduce(&view, ReduceOp::Sum)?;
                started.push((bucket.elems.clone(), handle));
                continue;
            }
            let mut runs: Vec<(bool, std::ops::Range<usize>)> = Vec::new();
            for i in bucket.slots.clone().filter(|&i| !early[i]) {
                let (expert, r) = (slots[i].role == ParamRole::ExpertBank, slots[i].range());
                match runs.last_mut() {
                    Some((e, run)) if *e == expert && run.end == r.start => run.end = r.end,
                    _ => runs.push((expert, r)),
                }
            }
            for (expert, elems) in runs {
                let view = flat.view(elems.start, [elems.len()])?;
                let handle = group(expert).start_all_reduce(&view, ReduceOp::Sum)?;
                started.push((elems, handle));
            }
        }
        for (elems, handle) in started {
            let sum = handle.wait()?;
            let mut view = flat.view(elems.start, [elems.len()])?;
            // 0 + scale·sum, in place in the flat buffer.
            view.fill_in_place(0.0)?;
            view.axpy(scale, &sum)?;
        }
        Ok(())
    }

    /// Global gradient-norm clipping across ranks (PyTorch `clip_grad_norm_` semantics,
    /// like `megamoe_optim::clip_grad_norm`): `Σ g²` of the replicated gradients counted
    /// once (they are identical on every rank after the reduce), plus the expert shards'
    /// `Σ g²` summed over the EP group.
    ///
    /// SYNC: one host read (the norm), as on one rank.
    pub(crate) fn clip_grad_norm(
        &mut self,
        grads: &mut GradBuffers,
        max_norm: Option<f64>,
    ) -> Result<ClipReport> {
        if let Some(m) = max_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(Error::TrainConfig {
                    field: "optim.grad_clip",
                    value: m.to_string(),
                    rule: "must be finite and > 0".to_string(),
                });
            }
        }
        let mut err = None;
        let squares = match self.sharded_grad_squares()? {
            Some((dense, expert)) => {
                let expert = if self.ep.size() > 1 {
                    self.ep.all_reduce(&expert, ReduceOp::Sum)?
                } else {
                    expert
                };
                dense.add(&expert)?
            }
            None => self.replicated_grad_squares(grads)?,
        };
        let norm_t = squares.sqrt()?.reshape(Vec::<usize>::new())?;
        if let Some(m) = max_norm {
            let factor = clip_factor(&norm_t, m)?;
            let mut scale = |g: &mut Tensor| {
                if err.is_none() {
                    err = g.scale_by_assign(&factor).err();
                }
            };
            match self.sharded.as_mut() {
                Some(s) => s.grads.visit_mut(&mut |_, g, _| scale(g)),
                None => grads.grads_mut().visit_mut(&mut |_, g, _| scale(g)),
            }
            if let Some(e) = err {
                return Err(e.into());
            }
        }
        // SYNC: the norm is a host value for metrics and the NaN/Inf guard.
        let norm = norm_t.to_scalar_f32()? as f64;
        let finite = norm.is_finite();
        let clipped = finite && max_norm.is_some_and(|m| norm > m);
        Ok(ClipReport {
            norm,
            finite,
            clipped,
            scale: match max_norm {
                Some(m) if clipped => (m as f32 / (norm as f32 + 1e-6)) as f64,
                _ => 1.0,
            },
        })
    }

    /// Σ g² of replicated-layout gradients: the dense ones as they are (identical on every
    /// rank), tensor-parallel slices' summed over tp, the expert shards' summed over ep.
    fn replicated_grad_squares(&self, grads: &GradBuffers) -> Result<Tensor> {
        let (mut dense, mut expert, mut tp_slices) = (Vec::new(), Vec::new(), Vec::new());
        let mut err = None;
        grads.grads().visit(&mut |name, g, role| {
            if err.is_some() {
                return;
            }
            match g.sum_squares().and_then(|s| s.reshape([1])) {
                Ok(s) if role == ParamRole::ExpertBank => expert.push(s),
                Ok(s) if self.is_tp_slice(name) => tp_slices.push(s),
                Ok(s) => dense.push(s),
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        let sum = |parts: &[Tensor]| -> Result<Tensor> {
            if parts.is_empty() {
                return Ok(Tensor::from_vec_f32(vec![0.0], [1], Device::Cpu)?);
            }
            let refs: Vec<&Tensor> = parts.iter().collect();
            Ok(Tensor::cat(&refs, 0)?.sum_all()?.reshape([1])?)
        };
        let mut squares = sum(&dense)?;
        if !tp_slices.is_empty() {
            // tensor-parallel slices: each TP rank holds a different part (module `tp`)
            squares = squares.add(&self.tp_sum(&sum(&tp_slices)?)?)?;
        }
        if !expert.is_empty() {
            let local = sum(&expert)?;
            let experts = if self.ep.size() > 1 {
                self.ep.all_reduce(&local, ReduceOp::Sum)?
            } else {
                local
            };
            squares = squares.add(&experts)?;
        }
        Ok(squares)
    }
}

/// Sums the step's loss parts, statistics and routing counts over the data ranks of
/// `comm`: every value travels as an f32 pair (high, low) so the f64 sums survive, the
/// ranks' values are gathered and added in rank order on the host (identical on every
/// rank).
///
/// SYNC: one host read of the gathered values per step.
fn reduce_sums(comm: &dyn Communicator, sums: &mut StepSums) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mine = pack(sums);
    let n = mine.len();
    let mut pairs = Vec::with_capacity(2 * n);
    for &v in &mine {
        let hi = v as f32;
        pairs.push(hi);
        pairs.push((v - hi as f64) as f32);
    }
    let local = Tensor::from_vec_f32(pairs, [2 * n], Device::Cpu)?;
    let all = comm.all_gather(&local)?.to_host_f32()?;
    let mut total = vec![0.0f64; n];
    for rank in all.chunks_exact(2 * n) {
        for (t, p) in total.iter_mut().zip(rank.chunks_exact(2)) {
            *t += p[0] as f64 + p[1] as f64;
        }
    }
    unpack(sums, &total)
}

/// The step sums as one flat list (fixed order; every rank has the same structure).
fn pack(s: &StepSums) -> Vec<f64> {
    let l = &s.loss;
    let mut v = vec![
        s.micro_batches as f64,
        l.total,
        l.lm,
        l.mtp,
        l.aux,
        l.z,
        l.skip,
        s.layers_used,
    ];
    v.extend(&s.mtp_losses);
    for &(a, m) in s.gate_skip.values() {
        v.extend([a, m]);
    }
    v.extend(s.flexi_kept.values());
    for m in s.moe.values() {
        v.extend(m.picks.iter().map(|&c| c as f64));
        v.extend(m.kept.iter().map(|&c| c as f64));
        v.extend([m.null_picks as f64, m.tokens as f64]);
        for d in &m.by_domain {
            v.extend(d.iter().map(|&c| c as f64));
        }
        if let Some((g, n)) = m.shared_gate {
            v.extend([g, n as f64]);
        }
    }
    v
}

/// Writes the summed list back, in [`pack`]'s order.
fn unpack(s: &mut StepSums, v: &[f64]) -> Result<()> {
    let mut it = v.iter().copied();
    let mut next = || {
        it.next().ok_or(Error::TrainConfig {
            field: "parallel",
            value: "step sums".to_string(),
            rule: "ranks reduced step sums of different structure".to_string(),
        })
    };
    let count = |x: f64| x.round().max(0.0) as u64;
    s.micro_batches = count(next()?) as usize;
    let l = &mut s.loss;
    l.total = next()?;
    l.lm = next()?;
    l.mtp = next()?;
    l.aux = next()?;
    l.z = next()?;
    l.skip = next()?;
    s.layers_used = next()?;
    for x in &mut s.mtp_losses {
        *x = next()?;
    }
    for (a, m) in s.gate_skip.values_mut() {
        *a = next()?;
        *m = next()?;
    }
    for x in s.flexi_kept.values_mut() {
        *x = next()?;
    }
    for m in s.moe.values_mut() {
        for c in m.picks.iter_mut().chain(m.kept.iter_mut()) {
            *c = count(next()?);
        }
        m.null_picks = count(next()?);
        m.tokens = count(next()?);
        for d in &mut m.by_domain {
            for c in d.iter_mut() {
                *c = count(next()?);
            }
        }
        if let Some((g, n)) = &mut m.shared_gate {
            *g = next()?;
            *n = count(next()?) as usize;
        }
    }
    Ok(())
}
