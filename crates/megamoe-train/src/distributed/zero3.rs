//! Fully sharded parameters (`parallel.fsdp = 3`, ZeRO-3 / FSDP2): between steps a rank
//! holds only its dim-0 rows of every parameter (the FSDP2 `chunk` rule over the
//! parameter's data-parallel group, as for `fsdp` 1/2: dense parameters over dense_dp,
//! expert banks over expert_dp) and its optimizer state for them.
//!
//! ```text
//! step start     embedding, final norm, LM head, MTP all-gathered for the step
//! each block     its tensors all-gathered just before its forward (the model's
//!                BlockGather hook), dropped after it; gathered again before its
//!                backward (recompute and input gradients), dropped after it; the
//!                next block's gathers are started while this block computes
//! after backward gradients reduce-scattered into the rank's rows (as fsdp 2), clip
//! optimizer      on the rank's rows (AdamW, or distributed Muon gathering each matrix)
//!                — the updated rows stay where they are: no all-gather after the step
//! ```
//! Evaluation and sampling gather what they read the same way (every rank calls them at
//! the same points, so the collectives match); checkpoints write each rank's rows.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use megamoe_comm::{Communicator, Pending};
use megamoe_model::block::BlockParams;
use megamoe_model::{BlockGather, ModelParams};
use megamoe_plan::RowShard;
use megamoe_tensor::Tensor;

use super::fsdp::pad_rows;
use super::Parallel;
use crate::error::Result;

/// Where one parameter's rows are: (row shard, expert bank?, full rows).
pub(super) type Placement = (RowShard, bool, usize);

/// Calls its argument once per `(name, tensor)` of a parameter set, in visit order.
pub(super) type VisitTensorsMut<'a> = dyn FnMut(&mut dyn FnMut(&str, &mut Tensor)) + 'a;

/// Gathers in flight: (handle, full rows) per picked tensor, in visit order.
type InFlight = Vec<(Pending, usize)>;

/// All-gathers tensors of rows into full tensors: every gather is started before the
/// first is awaited.
#[derive(Clone)]
pub(crate) struct RowGatherer {
    placements: Arc<HashMap<String, Placement>>,
    dense_dp: Arc<dyn Communicator>,
    expert_dp: Arc<dyn Communicator>,
    /// Blocks whose gathers were started ahead ([`BlockGather::prefetch_block`]).
    prefetched: Arc<Mutex<HashMap<usize, InFlight>>>,
}

impl RowGatherer {
    /// A gatherer of the tensors `placements` names, dense ones over `dense_dp`, expert
    /// banks over `expert_dp`.
    pub(super) fn new(
        placements: HashMap<String, Placement>,
        dense_dp: Arc<dyn Communicator>,
        expert_dp: Arc<dyn Communicator>,
    ) -> RowGatherer {
        RowGatherer {
            placements: Arc::new(placements),
            dense_dp,
            expert_dp,
            prefetched: Arc::default(),
        }
    }

    /// Replaces every tensor `visit` yields whose name `pick` accepts by its full tensor.
    pub(super) fn gather(
        &self,
        visit_mut: &mut VisitTensorsMut<'_>,
        pick: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        let pending = self.start(visit_mut, pick)?;
        self.finish(pending, visit_mut, pick)
    }

    /// Starts the gathers of the tensors `pick` accepts.
    fn start(
        &self,
        visit_mut: &mut VisitTensorsMut<'_>,
        pick: &dyn Fn(&str) -> bool,
    ) -> Result<InFlight> {
        let mut pending: Vec<Result<(Pending, usize)>> = Vec::new();
        visit_mut(&mut |name, t| {
            if !pick(name) {
                return;
            }
            let Some(&(rows, expert, full)) = self.placements.get(name) else {
                return;
            };
            let comm = if expert {
                &self.expert_dp
            } else {
                &self.dense_dp
            };
            pending.push(
                pad_rows(t, rows.padded_len).and_then(|p| Ok((comm.start_all_gather(&p)?, full))),
            );
        });
        pending.into_iter().collect()
    }

    /// Waits for `pending` and puts the full tensors in place.
    fn finish(
        &self,
        pending: InFlight,
        visit_mut: &mut VisitTensorsMut<'_>,
        pick: &dyn Fn(&str) -> bool,
    ) -> Result<()> {
        let mut gathered = Vec::with_capacity(pending.len());
        for (handle, full) in pending {
            gathered.push(handle.wait()?.narrow(0, 0, full)?);
        }
        let mut next = gathered.into_iter();
        visit_mut(&mut |name, t| {
            if pick(name) && self.placements.contains_key(name) {
                if let Some(g) = next.next() {
                    *t = g;
                }
            }
        });
        Ok(())
    }
}

impl std::fmt::Debug for RowGatherer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowGatherer")
            .field("parameters", &self.placements.len())
            .finish()
    }
}

impl BlockGather for RowGatherer {
    fn gather_block(
        &self,
        layer: usize,
        local: &BlockParams,
    ) -> megamoe_model::Result<BlockParams> {
        let mut full = local.clone();
        let prefix = format!("model.layers.{layer}");
        let ahead = self
            .prefetched
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&layer));
        let visit = &mut |f: &mut dyn FnMut(&str, &mut Tensor)| {
            full.visit_mut(&prefix, &mut |n, t, _| f(n, t))
        };
        match ahead {
            Some(pending) => self.finish(pending, visit, &|_| true),
            None => self.gather(visit, &|_| true),
        }
        .map_err(|e| gather_failed(layer, e))?;
        Ok(full)
    }

    fn prefetch_block(&self, layer: usize, local: &BlockParams) -> megamoe_model::Result<()> {
        let mut rows = local.clone();
        let prefix = format!("model.layers.{layer}");
        let pending = self
            .start(
                &mut |f| rows.visit_mut(&prefix, &mut |n, t, _| f(n, t)),
                &|_| true,
            )
            .map_err(|e| gather_failed(layer, e))?;
        if let Ok(mut p) = self.prefetched.lock() {
            p.insert(layer, pending);
        }
        Ok(())
    }
}

/// A failed gather as the model's error, naming the layer.
fn gather_failed(layer: usize, e: crate::error::Error) -> megamoe_model::Error {
    megamoe_model::Error::Gather {
        layer,
        source: Box::new(e),
    }
}

/// Whether a parameter lives outside the blocks (gathered for the whole step).
pub(super) fn outside_blocks(name: &str) -> bool {
    !name.starts_with("model.layers.")
}

impl Parallel {
    /// Whether parameters stay sharded between steps (`parallel.fsdp = 3`).
    pub(crate) fn holds_rows_only(&self) -> bool {
        self.rows_only
    }

    /// The all-gather of this rank's rows into full parameters (the model's per-block
    /// hook, and the step's embedding / norm / head gathers).
    pub(crate) fn row_gatherer(&self) -> Option<RowGatherer> {
        let state = self.sharded.as_ref()?;
        let mut placements = HashMap::new();
        for (name, &i) in &state.index {
            let (rows, expert) = state.rows[i];
            placements.insert(name.clone(), (rows, expert, state.full_rows[i]));
        }
        Some(RowGatherer::new(
            placements,
            self.dense_dp.clone(),
            self.expert_dp.clone(),
        ))
    }

    /// `local` (rows) with the tensors outside the blocks gathered (what a step, an
    /// evaluation or a sample runs with; the blocks gather theirs through the hook).
    pub(crate) fn gather_outside_blocks(&self, local: &ModelParams) -> Result<ModelParams> {
        let mut p = local.clone();
        if let Some(g) = self.row_gatherer() {
            g.gather(
                &mut |f| p.visit_mut(&mut |n, t, _| f(n, t)),
                &outside_blocks,
            )?;
        }
        Ok(p)
    }

    /// Every parameter of `local` (rows) gathered into the full model (checkpoints).
    pub(crate) fn gather_all(&self, local: &ModelParams) -> Result<ModelParams> {
        let mut p = local.clone();
        if let Some(g) = self.row_gatherer() {
            g.gather(&mut |f| p.visit_mut(&mut |n, t, _| f(n, t)), &|_| true)?;
        }
        Ok(p)
    }
}

/// The parameters the model runs with: `params` itself, or under `parallel.fsdp = 3` its
/// rows with everything outside the blocks gathered.
pub(crate) fn working_params<'a>(
    parallel: Option<&Parallel>,
    params: &'a ModelParams,
) -> Result<Cow<'a, ModelParams>> {
    match parallel {
        Some(p) if p.holds_rows_only() => Ok(Cow::Owned(p.gather_outside_blocks(params)?)),
        _ => Ok(Cow::Borrowed(params)),
    }
}
