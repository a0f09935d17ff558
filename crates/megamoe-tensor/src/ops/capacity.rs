//! Static-capacity expert buffers: the MoE permute writes the kept assignments straight into
//! `[E·C, d]` buffers and the combine reads them back, with every shape fixed by
//! `(T, k, E, C, d)` — no per-expert count is needed on the host (CUDA-graph safe).
//!
//! Expert `e` owns buffer rows `e·C .. (e+1)·C`, filled in (token, slot) order — the row
//! order of [`Tensor::sort_by_expert`] with pad rows after each expert's kept rows. A pad row
//! is zero on the way in and ignored on the way out. Index tensors use −1 for "no row":
//! `slot_row [T, k]` (buffer row of each assignment; −1 dropped or null) and
//! `row_token [E·C]` (token of each buffer row; −1 pad).
//!
//! The combine sums each token's rows in increasing buffer row, which is the order the
//! packed (dropless) path's `index_add_rows` uses, so both give identical bits.

use super::routing::{same_shape_as_idx, shape_err};
use crate::{Result, Tensor};

/// The static-capacity kernel family of a [`Backend`](crate::backend::Backend) (shapes and
/// semantics as the matching [`Tensor`] ops, validated by them; row ids outside `-1..bound`
/// and an expert keeping more than `capacity` are the backend's to report).
pub trait CapacityKernels {
    /// See [`Tensor::capacity_permutation`].
    fn capacity_permutation(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
        capacity: usize,
    ) -> Result<CapacityPermutation>;
    /// See [`Tensor::gather_rows_or_zero`].
    fn gather_rows_or_zero(&self, x: &Tensor, rows: &Tensor) -> Result<Tensor>;
    /// See [`Tensor::combine_slots`].
    fn combine_slots(
        &self,
        rows: &Tensor,
        slot_row: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<Tensor>;
    /// See [`Tensor::combine_slots_backward`].
    fn combine_slots_backward(
        &self,
        rows: &Tensor,
        d_y: &Tensor,
        slot_row: &Tensor,
        weights: &Tensor,
    ) -> Result<(Tensor, Tensor)>;
}

/// Where every kept assignment sits in the static `[E·C, d]` expert buffers.
#[derive(Debug, Clone)]
pub struct CapacityPermutation {
    /// `[T, k]` i32: buffer row `e·C + i` of each kept assignment, −1 for a dropped one or a
    /// null slot.
    pub slot_row: Tensor,
    /// `[E·C]` i32: token of each buffer row, −1 for a pad row.
    pub row_token: Tensor,
    /// `[E]` i32: kept rows per expert (each ≤ C).
    pub counts: Tensor,
}

impl Tensor {
    /// Static buffer layout of the kept assignments: `self` is `idx [T, k]` (pool slots;
    /// `< n_real` are real experts), `keep [T, k]` from [`Tensor::capacity_keep`] with the
    /// same `capacity`. Errors if an expert keeps more than `capacity` assignments.
    pub fn capacity_permutation(
        &self,
        keep: &Tensor,
        n_real: usize,
        capacity: usize,
    ) -> Result<CapacityPermutation> {
        const OP: &str = "capacity_permutation";
        self.same_device(OP, keep)?;
        self.dims2().map_err(|_| self.rank_error(OP, "idx", 2))?;
        same_shape_as_idx(OP, self, keep, "keep must have idx's shape [T, k]")?;
        self.backend()
            .capacity_permutation(self, keep, n_real, capacity)
    }

    /// Row gather with pad rows: `out[r] = self[rows[r]]` for `self [N, d]`, `rows [R]` i32,
    /// and a zero row where `rows[r] = −1`. Result `[R, d]` f32 (an exact bf16 copy of bf16
    /// rows in the CUDA backend's bf16-activation mode).
    pub fn gather_rows_or_zero(&self, rows: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_rows_or_zero";
        self.same_device(OP, rows)?;
        rows.expect_rank(OP, "rows", 1)?;
        self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        self.backend().gather_rows_or_zero(self, rows)
    }

    /// Fused static permute: [`Tensor::capacity_permutation`] of `idx`/`keep` and the gather
    /// of `self = x [T, d]` into the buffers in one call. Returns (`buffers [E·C, d]`, the
    /// layout); bit-identical to `x.gather_rows_or_zero(&perm.row_token)`.
    pub fn permute_to_capacity(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
        capacity: usize,
    ) -> Result<(Tensor, CapacityPermutation)> {
        const OP: &str = "permute_to_capacity";
        let (t, _) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        if idx.dims().first() != Some(&t) {
            return Err(shape_err(
                OP,
                self,
                idx,
                "x [T, d] and idx [T, k] need the same T",
            ));
        }
        let perm = idx.capacity_permutation(keep, n_real, capacity)?;
        let buffers = self.gather_rows_or_zero(&perm.row_token)?;
        Ok((buffers, perm))
    }

    /// Static combine: `self` is buffer rows `[B, d]`, `slot_row [T, k]` i32 (−1 = no row),
    /// `weights [T, k]` optional. `y[t] = Σ_j w[t, j] · self[slot_row[t, j]]` over the kept
    /// slots, summed in increasing buffer row. Result `[T, d]` f32 (with weights and bf16
    /// rows in the CUDA backend's bf16-activation mode: bf16, the f32 sum rounded once).
    /// With `weights = None` this is also the backward of the permute (`d_x` from
    /// `d_buffers`).
    pub fn combine_slots(&self, slot_row: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "combine_slots";
        self.same_device(OP, slot_row)?;
        self.dims2().map_err(|_| self.rank_error(OP, "rows", 2))?;
        slot_row
            .dims2()
            .map_err(|_| slot_row.rank_error(OP, "slot_row", 2))?;
        if let Some(w) = weights {
            if w.dims() != slot_row.dims() {
                return Err(shape_err(
                    OP,
                    slot_row,
                    w,
                    "weights must have slot_row's shape [T, k]",
                ));
            }
            self.same_device(OP, w)?;
        }
        self.backend().combine_slots(self, slot_row, weights)
    }

    /// Backward of [`Tensor::combine_slots`] with `weights`: `self` is the buffer rows
    /// `[B, d]` of the forward, `d_y [T, d]`. Returns (`d_rows [B, d]`: `w[t, j] · d_y[t]` in
    /// the row of assignment `(t, j)`, zero in pad rows; `d_w [T, k]`: `⟨d_y[t], rows[r]⟩`,
    /// zero where not kept), both written fresh; `d_rows` f32 (bf16 in the CUDA backend's
    /// bf16-activation mode when `self` or `d_y` is bf16), `d_w` f32.
    pub fn combine_slots_backward(
        &self,
        d_y: &Tensor,
        slot_row: &Tensor,
        weights: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "combine_slots_backward";
        self.same_device(OP, d_y)?;
        self.same_device(OP, slot_row)?;
        let (_, d) = self.dims2().map_err(|_| self.rank_error(OP, "rows", 2))?;
        let (t, _) = slot_row
            .dims2()
            .map_err(|_| slot_row.rank_error(OP, "slot_row", 2))?;
        if d_y.dims() != [t, d] {
            return Err(shape_err(
                OP,
                self,
                d_y,
                "d_y must be [T, d] with rows' width and slot_row's T",
            ));
        }
        if weights.dims() != slot_row.dims() {
            return Err(shape_err(
                OP,
                slot_row,
                weights,
                "weights must have slot_row's shape [T, k]",
            ));
        }
        self.backend()
            .combine_slots_backward(self, d_y, slot_row, weights)
    }
}
