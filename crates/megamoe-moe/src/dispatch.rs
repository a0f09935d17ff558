//! Token dispatch: moving each kept assignment's token row to its expert and the expert
//! outputs back (spec "Dispatch"; Megatron `token_dispatcher.py`).
//!
//! Each direction is three steps, so that an expert-parallel all-to-all dispatcher and fused
//! CUDA paths can replace single steps and overlap them with compute:
//!
//! | direction | local pre-step (no comm) | collective | local post-step (no comm) |
//! |---|---|---|---|
//! | dispatch | [`TokenDispatcher::permute`] | [`TokenDispatcher::dispatch_exchange`] | [`TokenDispatcher::expert_buffers`] |
//! | combine | [`TokenDispatcher::unbuffer`] | [`TokenDispatcher::combine_exchange`] | [`TokenDispatcher::combine`] |
//!
//! [`LocalDispatcher`] (one rank, every expert local): permute = stable counting sort of
//! the kept assignments by expert (inside an expert by token, then slot) plus a row gather;
//! the collectives are identities; combine is the weighted scatter-add
//! `y[t] = Σ_r [token_r = t] · g_r · out_r`, summed per token in increasing permuted-row
//! order — a fixed order, never atomics, so results are bit-identical for any thread count.
//!
//! Backward: [`TokenDispatcher::combine_backward`] gives `d_out_r = g_r · d_y[token_r]` and
//! `d_g_r = ⟨d_y[token_r], out_r⟩` (scattered back to `[N, K]`, zero for dropped assignments
//! and null slots); [`TokenDispatcher::dispatch_backward`] scatter-adds `d_rows` to `d_x`.

use megamoe_tensor::{DType, Tensor};

use crate::error::Result;

/// The seed's dispatch fast paths (`moe_dispatch_fast_paths.py`), on the CPU path:
/// both settings give bit-identical results; they change how the work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DispatchFastPaths {
    /// One fused op sorts the assignments and gathers the rows
    /// ([`Tensor::permute_by_expert`]) instead of a sort followed by `index_select`.
    pub fused_permute: bool,
    /// Compute the shared experts concurrently with route → dispatch → routed experts
    /// (`rayon::join`), the CPU analogue of overlapping shared-expert compute with the
    /// all-to-all.
    pub overlap_shared: bool,
}

/// Where every permuted row came from and how rows are grouped per expert.
#[derive(Debug, Clone)]
pub struct DispatchLayout {
    /// `[R]` i32: token of each permuted row (expert-major, then token, then slot).
    pub token: Tensor,
    /// `[R]` i32: flat assignment `t·K + j` of each permuted row.
    pub assignment: Tensor,
    /// `[E]` i32: kept rows per expert (device copy).
    pub counts: Tensor,
    /// Kept rows per expert, read on the host once per call.
    pub counts_host: Vec<usize>,
    /// `[R]` f32: gate of each permuted row.
    pub row_gates: Tensor,
    /// `Some(C)`: expert buffers are padded to exactly C rows per expert.
    pub pad_to: Option<usize>,
    /// N tokens.
    pub tokens: usize,
    /// K slots per token.
    pub slots_per_token: usize,
}

impl DispatchLayout {
    /// Rows per expert buffer as the grouped GEMM sees them (C each when padded).
    pub fn group_sizes(&self) -> Vec<usize> {
        match self.pad_to {
            Some(c) => vec![c; self.counts_host.len()],
            None => self.counts_host.clone(),
        }
    }

    /// Offsets of each expert's rows (exclusive prefix sum of the group sizes), `[E + 1]`.
    pub fn offsets(&self) -> Vec<usize> {
        let mut off = Vec::with_capacity(self.counts_host.len() + 1);
        let mut acc = 0;
        off.push(0);
        for c in self.group_sizes() {
            acc += c;
            off.push(acc);
        }
        off
    }

    /// R: kept assignments.
    pub fn rows(&self) -> usize {
        self.counts_host.iter().sum()
    }
}

/// Moves token rows to experts and back. Local pre/post steps never communicate.
pub trait TokenDispatcher: Send + Sync {
    /// Local pre-step: sort the kept assignments of `slots [N, K]` (`keep [N, K]`) by expert
    /// and gather their rows of `x [N, H]`; `gates [N, K]` are carried per row.
    fn permute(
        &self,
        x: &Tensor,
        slots: &Tensor,
        keep: &Tensor,
        gates: &Tensor,
    ) -> Result<(Tensor, DispatchLayout)>;

    /// Collective: send rows to the rank owning their expert (identity for one rank).
    fn dispatch_exchange(&self, rows: Tensor, layout: &DispatchLayout) -> Result<Tensor>;

    /// Local post-step: lay received rows out as expert buffers (pad rows when static).
    fn expert_buffers(&self, rows: Tensor, layout: &DispatchLayout) -> Result<Tensor>;

    /// Combine pre-step: drop pad rows of the expert outputs.
    fn unbuffer(&self, out: Tensor, layout: &DispatchLayout) -> Result<Tensor>;

    /// Collective: return rows to their source rank (identity for one rank).
    fn combine_exchange(&self, rows: Tensor, layout: &DispatchLayout) -> Result<Tensor>;

    /// Local post-step: `y [N, H]` = weighted scatter-add of the rows in token order.
    fn combine(&self, out_rows: &Tensor, layout: &DispatchLayout) -> Result<Tensor>;

    /// Backward of combine: (`d_out_rows [R, H]`, `d_gates [N, K]`), both written fresh.
    fn combine_backward(
        &self,
        d_y: &Tensor,
        out_rows: &Tensor,
        layout: &DispatchLayout,
    ) -> Result<(Tensor, Tensor)>;

    /// Backward of permute: `d_x [N, H]` = scatter-add of `d_rows [R, H]` (written fresh).
    fn dispatch_backward(&self, d_rows: &Tensor, layout: &DispatchLayout) -> Result<Tensor>;
}

/// Single-rank dispatcher: every expert is local.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalDispatcher {
    /// E.
    pub num_routed_experts: usize,
    /// Fast paths.
    pub fast_paths: DispatchFastPaths,
    /// `Some(C)` pads every expert buffer to C rows.
    pub pad_to: Option<usize>,
}

impl TokenDispatcher for LocalDispatcher {
    fn permute(
        &self,
        x: &Tensor,
        slots: &Tensor,
        keep: &Tensor,
        gates: &Tensor,
    ) -> Result<(Tensor, DispatchLayout)> {
        let e = self.num_routed_experts;
        let (rows, perm) = if self.fast_paths.fused_permute {
            x.permute_by_expert(slots, keep, e)?
        } else {
            let perm = slots.sort_by_expert(keep, e)?;
            (x.index_select(&perm.token)?, perm)
        };
        let (n, k) = slots.dims2()?;
        // SYNC: the grouped GEMM takes its group sizes as host values; one read of E
        // integers per call, at this one point (dropless shapes depend on it).
        let counts_host: Vec<usize> = perm
            .counts
            .to_host_i32()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let row_gates = gates
            .reshape([n * k, 1])?
            .index_select(&perm.assignment)?
            .reshape([perm.assignment.numel()])?;
        Ok((
            rows,
            DispatchLayout {
                token: perm.token,
                assignment: perm.assignment,
                counts: perm.counts,
                counts_host,
                row_gates,
                pad_to: self.pad_to,
                tokens: n,
                slots_per_token: k,
            },
        ))
    }

    fn dispatch_exchange(&self, rows: Tensor, _layout: &DispatchLayout) -> Result<Tensor> {
        Ok(rows)
    }

    fn expert_buffers(&self, rows: Tensor, layout: &DispatchLayout) -> Result<Tensor> {
        match layout.pad_to {
            Some(c) => Ok(rows.pad_groups(&layout.counts, c)?),
            None => Ok(rows),
        }
    }

    fn unbuffer(&self, out: Tensor, layout: &DispatchLayout) -> Result<Tensor> {
        match layout.pad_to {
            Some(c) => Ok(out.unpad_groups(&layout.counts, c)?),
            None => Ok(out),
        }
    }

    fn combine_exchange(&self, rows: Tensor, _layout: &DispatchLayout) -> Result<Tensor> {
        Ok(rows)
    }

    fn combine(&self, out_rows: &Tensor, layout: &DispatchLayout) -> Result<Tensor> {
        let h = out_rows.dim(1)?;
        let y = Tensor::zeros([layout.tokens, h], DType::F32, out_rows.device())?;
        Ok(y.index_add_rows(&layout.token, out_rows, Some(&layout.row_gates))?)
    }

    fn combine_backward(
        &self,
        d_y: &Tensor,
        out_rows: &Tensor,
        layout: &DispatchLayout,
    ) -> Result<(Tensor, Tensor)> {
        let (n, k) = (layout.tokens, layout.slots_per_token);
        let d_y_rows = d_y.index_select(&layout.token)?;
        let d_row_gates = d_y_rows.mul(out_rows)?.sum_last_dim()?;
        let d_out = d_y_rows.mul_col(&layout.row_gates)?;
        let r = layout.token.numel();
        let d_gates = Tensor::zeros([n * k, 1], DType::F32, d_y.device())?
            .index_add_rows(&layout.assignment, &d_row_gates.reshape([r, 1])?, None)?
            .reshape([n, k])?;
        Ok((d_out, d_gates))
    }

    fn dispatch_backward(&self, d_rows: &Tensor, layout: &DispatchLayout) -> Result<Tensor> {
        let h = d_rows.dim(1)?;
        let d_x = Tensor::zeros([layout.tokens, h], DType::F32, d_rows.device())?;
        Ok(d_x.index_add_rows(&layout.token, d_rows, None)?)
    }
}
