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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use megamoe_comm::{Communicator, Pending, ReduceOp};
use megamoe_model::block::BlockParams;
use megamoe_model::GradReady;
use megamoe_optim::ParamRole;
use megamoe_tensor::Tensor;

use super::Parallel;

/// One all-reduce started during the backward: the names of the tensors it carries (in
/// order, with their element counts) and its handle.
pub(crate) type Started = (Vec<(String, usize)>, Pending);

/// The hook (see the module docs).
pub(crate) struct GradOverlap {
    dense_dp: Arc<dyn Communicator>,
    expert_dp: Arc<dyn Communicator>,
    enabled: AtomicBool,
    armed: AtomicBool,
    started: Mutex<Vec<Started>>,
    /// All-reduces started during a backward so far.
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
            early: AtomicU64::new(0),
        }
    }

    fn start(&self, layer: usize, grads: &BlockParams) -> crate::error::Result<()> {
        let prefix = format!("model.layers.{layer}");
        for expert in [false, true] {
            let mut names = Vec::new();
            let mut flat = Vec::new();
            let mut err = None;
            grads.visit(&prefix, &mut |name, g, role| {
                if (role == ParamRole::ExpertBank) != expert || err.is_some() {
                    return;
                }
                match g.reshape([g.numel()]) {
                    Ok(t) => {
                        names.push((name.to_string(), g.numel()));
                        flat.push(t);
                    }
                    Err(e) => err = Some(e),
                }
            });
            if let Some(e) = err {
                return Err(e.into());
            }
            if flat.is_empty() {
                continue;
            }
            let comm = if expert {
                &self.expert_dp
            } else {
                &self.dense_dp
            };
            let refs: Vec<&Tensor> = flat.iter().collect();
            let handle = comm.start_all_reduce(&Tensor::cat(&refs, 0)?, ReduceOp::Sum)?;
            if let Ok(mut s) = self.started.lock() {
                s.push((names, handle));
            }
            self.early.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
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

    /// Gradient all-reduces started during a backward so far (0 with the overlap off or
    /// sharded gradients).
    pub fn overlapped_reduces(&self) -> u64 {
        self.overlap
            .as_ref()
            .map_or(0, |o| o.early.load(Ordering::Relaxed))
    }
}
