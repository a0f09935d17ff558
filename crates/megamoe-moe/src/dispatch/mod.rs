//! Token dispatch: moving each kept assignment's token row to the rank and expert that owns
//! it and the expert outputs back (spec "Dispatch"; Megatron `token_dispatcher.py`).
//!
//! Each direction is a local pre-step, a collective and a local post-step, so that an
//! expert-parallel all-to-all and fused CUDA paths can replace single steps and overlap them
//! with compute (e.g. the shared experts):
//!
//! | direction | local pre-step (no comm) | collective | local post-step (no comm) |
//! |---|---|---|---|
//! | dispatch | [`TokenDispatcher::permute`] | [`TokenDispatcher::exchange_layout`], [`TokenDispatcher::dispatch_exchange`] | [`TokenDispatcher::expert_buffers`] |
//! | combine | [`TokenDispatcher::unbuffer`] | [`TokenDispatcher::combine_exchange`] | [`TokenDispatcher::combine`] |
//!
//! Backward runs the same exchanges in reverse: [`TokenDispatcher::combine_backward`] at the
//! source → `dispatch_exchange` (the reverse of the combine exchange) → `expert_buffers` →
//! experts → `unbuffer` → `combine_exchange` (the reverse of the dispatch exchange) →
//! [`TokenDispatcher::dispatch_backward`] at the source.
//!
//! Two layouts describe one call. The source side ([`DispatchLayout`]) is where this rank's
//! kept assignments sit in its send rows, one of:
//! - *packed* (dropless, or capacity without padding): rows `[R, H]` sorted by expert (stable:
//!   inside an expert by token, then slot); R is data-dependent;
//! - *static capacity* (`pad_to_capacity`): the permute writes straight into `[E·C, H]`
//!   buffers (expert `e` at rows `e·C ..`, pad rows zero) and the combine reads from them:
//!   every shape is fixed by (N, K, E, C, H) and no count is read on the host.
//!
//! The expert side ([`ExpertLayout`]) is what the exchange delivered to this rank's local
//! experts `[e0, e1)`: rows per local expert, per-rank splits, and how received rows
//! (source-major) become expert buffers (expert-major).
//!
//! Combine is the weighted scatter-add `y[t] = Σ_r [token_r = t] · g_r · out_r`, summed per
//! token in increasing row order — a fixed order, never atomics, so results are bit-identical
//! for any thread count, and the packed and static paths give identical bits. Both layouts
//! carry `slot_row [N, K]` (the row of each kept assignment), so the combine, its backward
//! and the permute's backward are the same three ops for both ([`Tensor::combine_slots`],
//! [`Tensor::combine_slots_backward`]): one pass each, no scatter-add, and on a GPU in
//! bf16 mode bf16 rows in and out.
//!
//! Implementations: [`LocalDispatcher`] (one rank, every expert local; the exchanges are
//! identities) and [`ExpertParallelDispatcher`] (experts sharded over the ranks of a
//! [`RowExchange`]: counts exchange + `all_to_all_v` when packed, fixed splits and no counts
//! exchange in static-capacity mode).

mod expert_parallel;
mod local;

use std::ops::Range;

use megamoe_tensor::{RowGroups, Tensor};

use crate::error::Result;

pub use expert_parallel::{ExpertParallelDispatcher, RowExchange};
pub use local::LocalDispatcher;

/// The seed's dispatch fast paths (`moe_dispatch_fast_paths.py`), on the CPU path:
/// both settings give bit-identical results; they change how the work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DispatchFastPaths {
    /// One fused op sorts the assignments and gathers the rows
    /// ([`Tensor::permute_by_expert`], [`Tensor::permute_to_capacity`]) instead of a sort
    /// followed by a row gather.
    pub fused_permute: bool,
    /// Compute the shared experts on a helper thread concurrently with route → dispatch →
    /// routed experts, the CPU analogue of overlapping shared-expert compute with the
    /// all-to-all (the dispatcher's collectives stay on the calling thread).
    pub overlap_shared: bool,
}

/// The routing decision a permute consumes.
#[derive(Debug, Clone, Copy)]
pub struct Assignments<'a> {
    /// `[N, K]` i32 pool slot of each assignment (real experts `< E`).
    pub slots: &'a Tensor,
    /// `[N, K]` f32: 1 for a kept real assignment (after capacity), else 0.
    pub keep: &'a Tensor,
    /// `[N, K]` f32 gate of each assignment.
    pub gates: &'a Tensor,
}

/// How the source rows are laid out (see the module docs).
#[derive(Debug, Clone)]
pub enum SourceRows {
    /// Kept rows `[R, H]`, expert-major.
    Packed {
        /// `[R]` i32: token of each row.
        token: Tensor,
        /// `[R]` i32: flat assignment `t·K + j` of each row.
        assignment: Tensor,
        /// `[N, K]` i32: row of each assignment, −1 when not kept.
        slot_row: Tensor,
        /// `[N, K]` f32 gates (read only where kept).
        gates: Tensor,
    },
    /// Static buffers `[E·C, H]`, expert `e` at rows `e·C ..`, pad rows zero.
    Capacity {
        /// C: rows per expert.
        capacity: usize,
        /// `[N, K]` i32: buffer row of each assignment, −1 when not kept.
        slot_row: Tensor,
        /// `[E·C]` i32: token of each buffer row, −1 for a pad row.
        row_token: Tensor,
        /// `[N, K]` f32 gates (read only where kept).
        gates: Tensor,
    },
}

/// Source side of one call: where this rank's kept assignments sit in its send rows.
#[derive(Debug, Clone)]
pub struct DispatchLayout {
    /// N tokens of this rank.
    pub tokens: usize,
    /// K slots per token.
    pub slots_per_token: usize,
    /// E routed experts (global).
    pub num_experts: usize,
    /// `[E]` i32: kept rows of this rank's tokens per (global) expert.
    pub counts: Tensor,
    /// `counts` on the host when the permute had to read them (a device backend's packed
    /// sort): the expert layout's groups reuse them instead of reading the counts again.
    pub host_counts: Option<std::sync::Arc<[i32]>>,
    /// Row layout.
    pub rows: SourceRows,
}

impl DispatchLayout {
    /// `Some(C)` in static-capacity mode.
    pub fn capacity(&self) -> Option<usize> {
        match self.rows {
            SourceRows::Capacity { capacity, .. } => Some(capacity),
            SourceRows::Packed { .. } => None,
        }
    }
}

/// How received rows (source-major) map to expert buffers (expert-major).
#[derive(Debug, Clone)]
pub enum BufferOrder {
    /// Already expert-major (one source rank).
    Identity,
    /// Static blocks: received `[P, El, C, H]` ↔ buffers `[El, P, C, H]`.
    Blocks {
        /// P source ranks.
        sources: usize,
        /// El local experts.
        experts: usize,
        /// C rows per (source, expert) block.
        capacity: usize,
    },
    /// Packed rows: row gathers built from the exchanged counts.
    Gather {
        /// `[R_recv]` i32: received row of each buffer row.
        to_experts: Tensor,
        /// `[R_recv]` i32: buffer row of each received row (the inverse).
        to_sources: Tensor,
    },
}

/// Expert side of one call: what the exchange delivered to this rank's local experts.
#[derive(Debug, Clone)]
pub struct ExpertLayout {
    /// `[e0, e1)`: the local experts (global ids).
    pub experts: Range<usize>,
    /// Each local expert's rows in the expert buffers, as device tensors (the grouped GEMM
    /// reads them; nothing goes to the host): packed groups of the received counts, or with
    /// static capacity groups at a fixed stride (one rank: each expert's kept rows at `e·C`,
    /// pad rows skipped; P ranks: `P·C` rows per expert, pad rows included).
    pub groups: RowGroups,
    /// `[El]` i32 received token rows per local expert; `None` when they are not known
    /// without a counts exchange (static-capacity mode across ranks).
    pub counts: Option<Tensor>,
    /// Rows this rank sends to each rank, in rank order (dispatch direction).
    pub send_rows: Vec<usize>,
    /// Rows this rank receives from each rank, in rank order (dispatch direction).
    pub recv_rows: Vec<usize>,
    /// Received rows → expert buffers.
    pub order: BufferOrder,
}

/// Moves token rows to their experts' rank and back. Local pre/post steps never communicate
/// and have provided implementations shared by every dispatcher; an implementation supplies
/// where the experts live and the three collectives.
pub trait TokenDispatcher: Send + Sync + std::fmt::Debug {
    /// E: routed experts in the whole layer.
    fn num_experts(&self) -> usize;

    /// `[e0, e1)`: experts whose weights live on this rank.
    fn local_experts(&self) -> Range<usize>;

    /// Collective: the expert-side layout of a call (counts exchange when packed; nothing
    /// to exchange in static-capacity mode, whose splits are fixed).
    fn exchange_layout(&self, layout: &DispatchLayout) -> Result<ExpertLayout>;

    /// Collective, source → experts: send rows to the rank owning their expert (forward
    /// dispatch, and the reverse of the combine exchange in backward).
    fn dispatch_exchange(&self, rows: Tensor, el: &ExpertLayout) -> Result<Tensor>;

    /// Collective, experts → source: return rows to their source rank (forward combine, and
    /// the reverse of the dispatch exchange in backward).
    fn combine_exchange(&self, rows: Tensor, el: &ExpertLayout) -> Result<Tensor>;

    /// Local pre-step: lay the kept assignments' rows of `x [N, H]` out by expert — packed
    /// (`pad_to = None`) or straight into static `[E·C, H]` buffers (`pad_to = Some(C)`).
    fn permute(
        &self,
        x: &Tensor,
        a: Assignments<'_>,
        pad_to: Option<usize>,
        fused: bool,
    ) -> Result<(Tensor, DispatchLayout)> {
        permute(x, a, self.num_experts(), pad_to, fused)
    }

    /// Local post-step: received rows → expert buffers (the row layout of `el.groups`).
    fn expert_buffers(&self, rows: Tensor, el: &ExpertLayout) -> Result<Tensor> {
        reorder(rows, &el.order, true)
    }

    /// Local pre-step: expert buffers → rows in received order (inverse of
    /// [`TokenDispatcher::expert_buffers`]).
    fn unbuffer(&self, out: Tensor, el: &ExpertLayout) -> Result<Tensor> {
        reorder(out, &el.order, false)
    }

    /// Local post-step: `y [N, H]` = weighted sum of each token's returned rows.
    fn combine(&self, out_rows: &Tensor, layout: &DispatchLayout) -> Result<Tensor> {
        let (slot_row, gates) = layout.rows.slots();
        Ok(out_rows.combine_slots(slot_row, Some(gates))?)
    }

    /// Backward of combine: (`d_out_rows` in the source row layout, `d_gates [N, K]`), both
    /// written fresh (zero for pad rows, dropped assignments and null slots).
    fn combine_backward(
        &self,
        d_y: &Tensor,
        out_rows: &Tensor,
        layout: &DispatchLayout,
    ) -> Result<(Tensor, Tensor)> {
        let (slot_row, gates) = layout.rows.slots();
        Ok(out_rows.combine_slots_backward(d_y, slot_row, gates)?)
    }

    /// Backward of permute: `d_x [N, H]` = sum of each token's row gradients (written fresh).
    fn dispatch_backward(&self, d_rows: &Tensor, layout: &DispatchLayout) -> Result<Tensor> {
        Ok(d_rows.combine_slots(layout.rows.slots().0, None)?)
    }
}

impl SourceRows {
    /// (`slot_row [N, K]`: the row of each kept assignment, −1 otherwise; `gates [N, K]`):
    /// what the combine and its backward read in either layout.
    fn slots(&self) -> (&Tensor, &Tensor) {
        match self {
            SourceRows::Packed {
                slot_row, gates, ..
            }
            | SourceRows::Capacity {
                slot_row, gates, ..
            } => (slot_row, gates),
        }
    }
}

/// The shared local permute (see [`TokenDispatcher::permute`]).
fn permute(
    x: &Tensor,
    a: Assignments<'_>,
    e: usize,
    pad_to: Option<usize>,
    fused: bool,
) -> Result<(Tensor, DispatchLayout)> {
    let (n, k) = a.slots.dims2()?;
    let (rows, counts, host_counts, layout_rows) = match pad_to {
        None => {
            let (rows, perm) = if fused {
                x.permute_by_expert(a.slots, a.keep, e)?
            } else {
                let perm = a.slots.sort_by_expert(a.keep, e)?;
                (x.index_select(&perm.token)?, perm)
            };
            let packed = SourceRows::Packed {
                token: perm.token,
                assignment: perm.assignment,
                slot_row: perm.slot_row,
                gates: a.gates.clone(),
            };
            (rows, perm.counts, perm.host_counts, packed)
        }
        Some(capacity) => {
            let (rows, perm) = if fused {
                x.permute_to_capacity(a.slots, a.keep, e, capacity)?
            } else {
                let perm = a.slots.capacity_permutation(a.keep, e, capacity)?;
                (x.gather_rows_or_zero(&perm.row_token)?, perm)
            };
            let fixed = SourceRows::Capacity {
                capacity,
                slot_row: perm.slot_row,
                row_token: perm.row_token,
                gates: a.gates.clone(),
            };
            (rows, perm.counts, None, fixed)
        }
    };
    Ok((
        rows,
        DispatchLayout {
            tokens: n,
            slots_per_token: k,
            num_experts: e,
            counts,
            host_counts,
            rows: layout_rows,
        },
    ))
}

/// Received order → expert order (`to_experts`) or back.
fn reorder(rows: Tensor, order: &BufferOrder, to_experts: bool) -> Result<Tensor> {
    match order {
        BufferOrder::Identity => Ok(rows),
        BufferOrder::Blocks {
            sources,
            experts,
            capacity,
        } => {
            let (r, h) = rows.dims2()?;
            let (outer, inner) = if to_experts {
                (*sources, *experts)
            } else {
                (*experts, *sources)
            };
            Ok(rows
                .reshape([outer, inner, capacity * h])?
                .permute(&[1, 0, 2])?
                .reshape([r, h])?)
        }
        BufferOrder::Gather {
            to_experts: fwd,
            to_sources: back,
        } => Ok(rows.index_select(if to_experts { fwd } else { back })?),
    }
}
