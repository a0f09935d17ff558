//! MoE routing ops: group-limited masking, null-slot pool expansion, gate normalisation,
//! capacity selection, slot counts, the stable permutation of assignments by expert, and
//! pad rows for static expert buffers.
//!
//! Shapes: `T` tokens, `E` real experts, `Ep = E + n_null` pool slots, `k` slots per token.
//! Assignment `a = t·k + j` is slot `j` (0 = best) of token `t`; `idx [T, k]` (i32) holds
//! its pool slot, real experts are `< E`, null slots `≥ E`. Masks are f32 `1.0`/`0.0`.
//! All outputs are deterministic and independent of the rayon thread count.

use crate::{Error, Result, Tensor};

/// The routing kernel family of a [`Backend`](crate::backend::Backend): the router's
/// selection helpers, capacity, expert sort and group padding (semantics and shapes as
/// the matching [`Tensor`] ops, validated by them; ids out of range and counts that do not
/// fit the declared bound are the backend's to report).
pub trait RoutingKernels {
    /// See [`Tensor::group_limited_mask`].
    fn group_limited_mask(
        &self,
        sel: &Tensor,
        n_groups: usize,
        topk_groups: usize,
    ) -> Result<Tensor>;
    /// See [`Tensor::expand_null_slots`].
    fn expand_null_slots(&self, z: &Tensor, z_null: &Tensor, n_null: usize) -> Result<Tensor>;
    /// See [`Tensor::reduce_null_slots`].
    fn reduce_null_slots(&self, d_pool: &Tensor, n_real: usize) -> Result<(Tensor, Tensor)>;
    /// See [`Tensor::real_slot_mask`].
    fn real_slot_mask(&self, idx: &Tensor, n_real: usize) -> Result<Tensor>;
    /// See [`Tensor::normalize_rows`].
    fn normalize_rows(&self, g: &Tensor, eps: f32) -> Result<Tensor>;
    /// See [`Tensor::normalize_rows_backward`].
    fn normalize_rows_backward(&self, g: &Tensor, d_n: &Tensor, eps: f32) -> Result<Tensor>;
    /// See [`Tensor::capacity_keep`].
    fn capacity_keep(
        &self,
        idx: &Tensor,
        gates: &Tensor,
        n_real: usize,
        capacity: Option<usize>,
        order: KeepOrder,
    ) -> Result<Tensor>;
    /// See [`Tensor::slot_counts`].
    fn slot_counts(
        &self,
        idx: &Tensor,
        keep: Option<&Tensor>,
        n_slots: usize,
        seg_tokens: usize,
    ) -> Result<Tensor>;
    /// See [`Tensor::sort_by_expert`] (a data-dependent output size: the dynamic path).
    fn sort_by_expert(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
    ) -> Result<ExpertPermutation>;
    /// See [`Tensor::pad_groups`].
    fn pad_groups(&self, x: &Tensor, counts: &Tensor, capacity: usize) -> Result<Tensor>;
    /// See [`Tensor::unpad_groups`].
    fn unpad_groups(
        &self,
        x: &Tensor,
        counts: &Tensor,
        capacity: usize,
        rows: usize,
    ) -> Result<Tensor>;
    /// See [`Tensor::expert_bias_step`].
    fn expert_bias_step(&self, counts: &Tensor, rate: f32, centre: bool) -> Result<Tensor>;
    /// See [`Tensor::kept_slots`].
    fn kept_slots(&self, idx: &Tensor, keep: &Tensor) -> Result<Tensor>;
    /// See [`Tensor::route`]; the default is its definition,
    /// [`route_composed`](crate::ops::router::route_composed).
    fn route(
        &self,
        logits: &Tensor,
        bias: Option<&Tensor>,
        spec: &crate::ops::router::RouteSpec,
    ) -> Result<crate::ops::router::Routed> {
        crate::ops::router::route_composed(logits, bias, spec)
    }
    /// See [`Tensor::route_backward`]; the default is its definition,
    /// [`route_backward_composed`](crate::ops::router::route_backward_composed).
    fn route_backward(
        &self,
        d_gates: &Tensor,
        saved: crate::ops::router::RouteSaved<'_>,
        spec: &crate::ops::router::RouteSpec,
        losses: crate::ops::router::RouteLossGrads<'_>,
    ) -> Result<Tensor> {
        crate::ops::router::route_backward_composed(d_gates, saved, spec, losses)
    }
}

/// Which assignments survive when an expert receives more than its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepOrder {
    /// Keep the highest gates (ties → lower token, then lower slot).
    HighestGate,
    /// Keep the earliest assignments in (token, slot) order.
    Earliest,
}

/// Kept assignments sorted by expert (a stable counting sort).
#[derive(Debug, Clone)]
pub struct ExpertPermutation {
    /// `[R]` i32: token of permuted row `r` (expert 0's rows first; inside an expert, in
    /// (token, slot) order).
    pub token: Tensor,
    /// `[R]` i32: flat assignment index `t·k + j` of permuted row `r`.
    pub assignment: Tensor,
    /// `[T, k]` i32: permuted row of each assignment, −1 where it is not kept (the inverse
    /// of `assignment`; the combine ops read it as their `slot_row`).
    pub slot_row: Tensor,
    /// `[E]` i32: kept rows per expert; row offsets are its exclusive prefix sum.
    pub counts: Tensor,
    /// `counts` on the host when the backend had to read them to size the permutation (a
    /// device backend: its one counted read); `None` on the CPU, which reads them in place.
    /// A dropless MoE layer hands them to its grouped GEMMs ([`crate::RowGroups::packed_known`])
    /// instead of reading the counts a second time.
    pub host_counts: Option<std::sync::Arc<[i32]>>,
}

pub(super) fn shape_err(op: &'static str, lhs: &Tensor, rhs: &Tensor, rule: &'static str) -> Error {
    Error::ShapeMismatch {
        op,
        lhs: lhs.dims().to_vec(),
        rhs: rhs.dims().to_vec(),
        rule,
    }
}

fn invalid(op: &'static str, arg: &'static str, value: usize, rule: &'static str) -> Error {
    Error::InvalidArgument {
        op,
        arg,
        value: value.to_string(),
        rule,
    }
}

/// Errors (`rule`) unless `other` has `idx`'s shape `[T, k]` (gates, keep flags).
pub(super) fn same_shape_as_idx(
    op: &'static str,
    idx: &Tensor,
    other: &Tensor,
    rule: &'static str,
) -> Result<()> {
    if other.dims() != idx.dims() {
        return Err(shape_err(op, idx, other, rule));
    }
    Ok(())
}

/// Checks `idx [T, k]` holds slots in `0..bound`; returns `(T, k)`.
fn check_slots(op: &'static str, idx: &Tensor) -> Result<(usize, usize)> {
    idx.dims2().map_err(|_| idx.rank_error(op, "idx", 2))
}

impl Tensor {
    /// Group-limited routing mask (DeepSeek-V3): `self` is selection scores `[T, E]`, split
    /// into `n_groups` equal groups; a group's score is the sum of its top-2 entries (top-1
    /// when a group has one expert); per token the best `topk_groups` groups (ties → lower
    /// group index) keep their scores and every other entry becomes −∞. Result `[T, E]`.
    pub fn group_limited_mask(&self, n_groups: usize, topk_groups: usize) -> Result<Tensor> {
        const OP: &str = "group_limited_mask";
        let (_, e) = self.dims2().map_err(|_| self.rank_error(OP, "sel", 2))?;
        if n_groups == 0 || !e.is_multiple_of(n_groups) {
            return Err(invalid(
                OP,
                "n_groups",
                n_groups,
                "must be >= 1 and divide E",
            ));
        }
        if topk_groups == 0 || topk_groups > n_groups {
            return Err(invalid(
                OP,
                "topk_groups",
                topk_groups,
                "must be in 1..=n_groups",
            ));
        }
        self.backend()
            .group_limited_mask(self, n_groups, topk_groups)
    }

    /// Null-slot pool logits: `self` is real logits `[T, E]`, `z_null [T, 1]` the null logit;
    /// result `[T, E + n_null]` with `z_null` repeated in columns `E..E+n_null`.
    pub fn expand_null_slots(&self, z_null: &Tensor, n_null: usize) -> Result<Tensor> {
        const OP: &str = "expand_null_slots";
        self.same_device(OP, z_null)?;
        let (t, _) = self.dims2().map_err(|_| self.rank_error(OP, "z", 2))?;
        if z_null.dims() != [t, 1] {
            return Err(shape_err(
                OP,
                self,
                z_null,
                "z_null must be [T, 1] for z [T, E]",
            ));
        }
        self.backend().expand_null_slots(self, z_null, n_null)
    }

    /// Backward of [`Tensor::expand_null_slots`]: `self` is `d_pool [T, E + n_null]`; returns
    /// (`d_z [T, E]`, `d_null [T, 1]` = sum over the null columns).
    pub fn reduce_null_slots(&self, n_real: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "reduce_null_slots";
        let (_, w) = self.dims2().map_err(|_| self.rank_error(OP, "d_pool", 2))?;
        if n_real > w {
            return Err(invalid(OP, "n_real", n_real, "must be <= the pool width"));
        }
        self.backend().reduce_null_slots(self, n_real)
    }

    /// `self` is `idx [T, k]` (i32 pool slots); result `[T, k]` f32: 1 where the slot is a
    /// real expert (`< n_real`), 0 where it is a null slot.
    pub fn real_slot_mask(&self, n_real: usize) -> Result<Tensor> {
        const OP: &str = "real_slot_mask";
        self.dims2().map_err(|_| self.rank_error(OP, "idx", 2))?;
        self.backend().real_slot_mask(self, n_real)
    }

    /// Row normalisation of gates `g [T, k]`: `g / (Σ_row g + eps)` (sum in f64).
    pub fn normalize_rows(&self, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows";
        self.dims2().map_err(|_| self.rank_error(OP, "g", 2))?;
        self.backend().normalize_rows(self, eps)
    }

    /// Backward of [`Tensor::normalize_rows`]; `self` is the INPUT `g`. With
    /// `S = Σ g + eps` and `n = g / S`: `dg_i = (dn_i − Σ_j dn_j n_j) / S`, written fresh.
    pub fn normalize_rows_backward(&self, d_n: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows_backward";
        self.same_shape(OP, d_n)?;
        self.dims2().map_err(|_| self.rank_error(OP, "g", 2))?;
        self.backend().normalize_rows_backward(self, d_n, eps)
    }

    /// Capacity selection: `self` is `idx [T, k]` (pool slots), `gates [T, k]` their gates.
    /// Each real expert (`< n_real`) keeps at most `capacity` assignments chosen by `order`
    /// (`None` = dropless). Result `keep [T, k]` f32: 1 for a kept real assignment, 0 for a
    /// dropped one or a null slot.
    pub fn capacity_keep(
        &self,
        gates: &Tensor,
        n_real: usize,
        capacity: Option<usize>,
        order: KeepOrder,
    ) -> Result<Tensor> {
        const OP: &str = "capacity_keep";
        self.same_device(OP, gates)?;
        check_slots(OP, self)?;
        same_shape_as_idx(OP, self, gates, "gates must have idx's shape [T, k]")?;
        self.backend()
            .capacity_keep(self, gates, n_real, capacity, order)
    }

    /// Slot counts per segment: `self` is `idx [T, k]` (slots `< n_slots`); `keep [T, k]`
    /// optional (count only where non-zero); tokens form `T / seg_tokens` segments of
    /// `seg_tokens` consecutive tokens. Result `[T / seg_tokens, n_slots]` f32 (exact
    /// integers). `seg_tokens = T` gives one row of totals.
    pub fn slot_counts(
        &self,
        keep: Option<&Tensor>,
        n_slots: usize,
        seg_tokens: usize,
    ) -> Result<Tensor> {
        const OP: &str = "slot_counts";
        let (t, _) = check_slots(OP, self)?;
        if seg_tokens == 0 || !t.is_multiple_of(seg_tokens) {
            return Err(invalid(
                OP,
                "seg_tokens",
                seg_tokens,
                "must be >= 1 and divide T",
            ));
        }
        if let Some(w) = keep {
            same_shape_as_idx(OP, self, w, "keep must have idx's shape [T, k]")?;
            self.same_device(OP, w)?;
        }
        self.backend().slot_counts(self, keep, n_slots, seg_tokens)
    }

    /// The kept slot of each assignment: `self` is `idx [T, k]` (i32), `keep [T, k]` f32 from
    /// [`Tensor::capacity_keep`]; result `[T, k]` i32: `idx` where `keep ≠ 0`, else −1.
    pub fn kept_slots(&self, keep: &Tensor) -> Result<Tensor> {
        const OP: &str = "kept_slots";
        self.same_device(OP, keep)?;
        check_slots(OP, self)?;
        same_shape_as_idx(OP, self, keep, "keep must have idx's shape [T, k]")?;
        self.backend().kept_slots(self, keep)
    }

    /// Stable permutation of the kept assignments by expert: `self` is `idx [T, k]`, `keep
    /// [T, k]` from [`Tensor::capacity_keep`]. Null slots and dropped assignments get no row.
    pub fn sort_by_expert(&self, keep: &Tensor, n_real: usize) -> Result<ExpertPermutation> {
        const OP: &str = "sort_by_expert";
        self.same_device(OP, keep)?;
        check_slots(OP, self)?;
        same_shape_as_idx(OP, self, keep, "keep must have idx's shape [T, k]")?;
        self.backend().sort_by_expert(self, keep, n_real)
    }

    /// Fused dispatch pre-step: [`Tensor::sort_by_expert`] of `idx`/`keep` and the row gather
    /// of `self = x [T, d]` into expert order in one call. Returns (`x_perm [R, d]`, the
    /// permutation). Bit-identical to `x.index_select(&perm.token)`.
    pub fn permute_by_expert(
        &self,
        idx: &Tensor,
        keep: &Tensor,
        n_real: usize,
    ) -> Result<(Tensor, ExpertPermutation)> {
        const OP: &str = "permute_by_expert";
        let (t, _) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        if idx.dim(0)? != t {
            return Err(shape_err(
                OP,
                self,
                idx,
                "x [T, d] and idx [T, k] need the same T",
            ));
        }
        let perm = idx.sort_by_expert(keep, n_real)?;
        let rows = self.index_select(&perm.token)?;
        Ok((rows, perm))
    }

    /// Static expert buffers: `self` is rows `[Σ counts, d]` grouped by expert, `counts [G]`
    /// i32 (each ≤ `capacity`); result `[G · capacity, d]` with group `g` at rows
    /// `g·capacity ..` followed by zero pad rows.
    pub fn pad_groups(&self, counts: &Tensor, capacity: usize) -> Result<Tensor> {
        const OP: &str = "pad_groups";
        self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        self.backend().pad_groups(self, counts, capacity)
    }

    /// Inverse of [`Tensor::pad_groups`]: `self` is `[G · capacity, d]`; drops the pad rows.
    /// `rows` is Σ counts, passed by the caller (it is the row count of the unpadded buffer
    /// it padded) so that the output shape never needs the counts on the host; the backend
    /// checks it.
    pub fn unpad_groups(&self, counts: &Tensor, capacity: usize, rows: usize) -> Result<Tensor> {
        const OP: &str = "unpad_groups";
        self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        self.backend().unpad_groups(self, counts, capacity, rows)
    }

    /// Aux-loss-free balancing step (Loss-Free Balancing, arXiv 2408.15664): `self` is
    /// per-expert token counts `c [E]` (f32); returns `Δb [E]` with
    /// `Δb_i = rate · sign(mean(c) − c_i)` (sign(0) = 0), and, if `centre`, `mean(Δb)`
    /// subtracted so the bias stays centred. Add it to the bias: `b ← b + Δb`.
    pub fn expert_bias_step(&self, rate: f32, centre: bool) -> Result<Tensor> {
        const OP: &str = "expert_bias_step";
        self.expect_rank(OP, "counts", 1)?;
        self.backend().expert_bias_step(self, rate, centre)
    }
}
