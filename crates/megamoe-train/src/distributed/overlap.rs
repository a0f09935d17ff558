//! Data-parallel gradient reduce overlapped with the backward (`parallel.fsdp = 0`): on
//! the last micro-batch of a step ([`Parallel::arm_overlap`]), the model's
//! [`GradReady`] hook starts each block's gradient all-reduce (dense tensors over
//! dense_dp, expert banks over expert_dp) as soon as the backward has finished that
//! block's weight gradients, while the backward goes on with the weight gradients of the
//! blocks before it (the model computes every input gradient first). The
//! tensors outside the blocks (embedding, norms, head, MTP) are reduced after the
//! backward by bucket, as are all gradients when the overlap is off. The reduce is a sum
//! in rank order per element, whatever the grouping, so the overlapped step has the same
//! bits as the step that reduces after the backward.
//!
//! Nothing is copied: a block's gradients of one rank group are views of the flat gradient
//! buffer ([`Parallel::attach_grad_buffer`]), consecutive in it except where the other
//! group's tensors sit between them (an MoE block's expert banks), so each maximal run of
//! adjacent gradients is posted as ONE view of the flat buffer, and the sum is written back
//! into that view after the backward (`reduce.rs`).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use megamoe_comm::{Communicator, Pending, ReduceOp};
use megamoe_model::block::BlockParams;
use megamoe_model::{GradBuffers, GradReady};
use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use super::Parallel;

/// One all-reduce started during the backward: the names of the gradients it carries, the
/// element range of the flat gradient buffer it reduces (they fill it exactly) and its handle.
pub(crate) struct Started {
    pub names: Vec<String>,
    pub elems: Range<usize>,
    pub handle: Pending,
}

/// The hook (see the module docs).
pub(crate) struct GradOverlap {
    dense_dp: Arc<dyn Communicator>,
    expert_dp: Arc<dyn Communicator>,
    enabled: AtomicBool,
    armed: AtomicBool,
    started: Mutex<Vec<Started>>,
    /// The flat gradient buffer the block gradients view.
    flat: Mutex<Option<Tensor>>,
    /// (block, rank group) gradient sets whose all-reduce started during a backward so far.
    early: AtomicU64,
}

impl std::fmt::Debug for GradOverlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradOverlap")
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .field("early", &self.early.load(Ordering::Relaxed))
            .finish()
    }
}

impl GradOverlap {
    pub(crate) fn new(
        dense_dp: Arc<dyn Communicator>,
        expert_dp: Arc<dyn Communicator>,
    ) -> GradOverlap {
        GradOverlap {
            dense_dp,
            expert_dp,
            enabled: AtomicBool::new(true),
            armed: AtomicBool::new(false),
            started: Mutex::new(Vec::new()),
            flat: Mutex::new(None),
            early: AtomicU64::new(0),
        }
    }

    fn start(&self, layer: usize, grads: &BlockParams) -> crate::error::Result<()> {
        let flat = match self.flat.lock() {
            Ok(f) => f.clone(),
            Err(_) => None,
        };
        let flat = flat.ok_or_else(|| detached("no flat gradient buffer is attached"))?;
        let prefix = format!("model.layers.{layer}");
        for expert in [false, true] {
            // Runs of adjacent gradients of this group, in visit (= flat buffer) order.
            let mut runs: Vec<(Vec<String>, Range<usize>)> = Vec::new();
            let mut err = None;
            grads.visit(&prefix, &mut |name, g, role| {
                if (role == ParamRole::ExpertBank) != expert || err.is_some() {
                    return;
                }
                if !g.same_storage(&flat) {
                    err = Some(detached(name));
                    return;
                }
                let r = g.layout().range();
                match runs.last_mut() {
                    Some((names, run)) if run.end == r.start => {
                        names.push(name.to_string());
                        run.end = r.end;
                    }
                    _ => runs.push((vec![name.to_string()], r)),
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
            if runs.is_empty() {
                continue;
            }
            let comm = if expert {
                &self.expert_dp
            } else {
                &self.dense_dp
            };
            for (names, elems) in runs {
                let view = flat.view(elems.start, [elems.len()])?;
                let handle = comm.start_all_reduce(&view, ReduceOp::Sum)?;
                if let Ok(mut s) = self.started.lock() {
                    s.push(Started {
                        names,
                        elems,
                        handle,
                    });
                }
            }
            self.early.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The named error for a block gradient that is not a view of the attached flat buffer.
fn detached(what: &str) -> crate::error::Error {
    crate::error::Error::TrainConfig {
        field: "parallel",
        value: what.to_string(),
        rule: "the overlapped gradient reduce needs every block gradient to view the flat \
               gradient buffer"
            .to_string(),
    }
}

impl GradReady for GradOverlap {
    fn block_grads_done(&self, layer: usize, grads: &BlockParams) -> megamoe_model::Result<()> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.start(layer, grads)
            .map_err(|e| megamoe_model::Error::GradReady {
                layer,
                source: Box::new(e),
            })
    }
}

impl Parallel {
    /// The hook to install in the model, when this layout reduces whole gradients.
    pub(crate) fn grad_overlap(&self) -> Option<Arc<GradOverlap>> {
        self.overlap.clone()
    }

    /// Tells the hook which flat buffer the gradients view (call again whenever the
    /// gradient buffers are rebuilt).
    pub(crate) fn attach_grad_buffer(&self, grads: &GradBuffers) {
        if let Some(o) = &self.overlap {
            if let Ok(mut f) = o.flat.lock() {
                *f = grads.flat().cloned();
            }
        }
    }

    /// Arms the hook for the coming backward (the step's last micro-batch).
    pub(crate) fn arm_overlap(&self) {
        if let Some(o) = &self.overlap {
            let on = o.enabled.load(Ordering::Relaxed);
            o.armed.store(on, Ordering::Relaxed);
        }
    }

    /// Disarms the hook and returns the all-reduces it started, in start order.
    pub(crate) fn take_started(&self) -> Vec<Started> {
        let Some(o) = &self.overlap else {
            return Vec::new();
        };
        o.armed.store(false, Ordering::Relaxed);
        o.started
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    /// Turns the overlap on (the default) or off: off, every gradient is reduced after
    /// the backward (same bits; for comparisons).
    pub fn set_grad_overlap(&self, on: bool) {
        if let Some(o) = &self.overlap {
            o.enabled.store(on, Ordering::Relaxed);
        }
    }

    /// (block, rank group) gradient sets whose all-reduce started during a backward so far
    /// (0 with the overlap off or sharded gradients); each is one all-reduce per run of
    /// adjacent gradients.
    pub fn overlapped_reduces(&self) -> u64 {
        self.overlap
            .as_ref()
            .map_or(0, |o| o.early.load(Ordering::Relaxed))
    }
}
