//! MoE routing ops: group-limited masking, null-slot pool expansion, gate normalisation,
//! capacity selection, slot counts, the stable permutation of assignments by expert, and
//! pad rows for static expert buffers.
//!
//! Shapes: `T` tokens, `E` real experts, `Ep = E + n_null` pool slots, `k` slots per token.
//! Assignment `a = t·k + j` is slot `j` (0 = best) of token `t`; `idx [T, k]` (i32) holds
//! its pool slot, real experts are `< E`, null slots `≥ E`. Masks are f32 `1.0`/`0.0`.
//! All outputs are deterministic and independent of the rayon thread count.

use crate::cpu::routing as kernel;
use crate::{Error, Result, Tensor};

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
    /// `[E]` i32: kept rows per expert; row offsets are its exclusive prefix sum.
    pub counts: Tensor,
}

fn shape_err(op: &'static str, lhs: &Tensor, rhs: &Tensor, rule: &'static str) -> Error {
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

/// Checks `idx [T, k]` holds slots in `0..bound`; returns `(T, k)`.
fn check_slots(op: &'static str, idx: &Tensor, bound: usize) -> Result<(usize, usize)> {
    let (t, k) = idx.dims2().map_err(|_| idx.rank_error(op, "idx", 2))?;
    let ids = idx.cpu_i32(op, "idx")?;
    if let Some((position, &index)) = ids
        .iter()
        .enumerate()
        .find(|(_, &i)| i < 0 || i as usize >= bound)
    {
        return Err(Error::IndexOutOfRange {
            op,
            index: index as i64,
            position,
            bound,
        });
    }
    Ok((t, k))
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
        let s = self.cpu_f32(OP, "sel")?;
        Ok(Tensor::cpu_f32_from(
            kernel::group_limited_mask(&s, e, n_groups, topk_groups),
            self.shape(),
        ))
    }

    /// Null-slot pool logits: `self` is real logits `[T, E]`, `z_null [T, 1]` the null logit;
    /// result `[T, E + n_null]` with `z_null` repeated in columns `E..E+n_null`.
    pub fn expand_null_slots(&self, z_null: &Tensor, n_null: usize) -> Result<Tensor> {
        const OP: &str = "expand_null_slots";
        self.same_device(OP, z_null)?;
        let (t, e) = self.dims2().map_err(|_| self.rank_error(OP, "z", 2))?;
        if z_null.dims() != [t, 1] {
            return Err(shape_err(
                OP,
                self,
                z_null,
                "z_null must be [T, 1] for z [T, E]",
            ));
        }
        let z = self.cpu_f32(OP, "z")?;
        let zn = z_null.cpu_f32(OP, "z_null")?;
        Ok(Tensor::cpu_f32_from(
            kernel::expand_null_slots(&z, e, &zn, n_null),
            [t, e + n_null],
        ))
    }

    /// Backward of [`Tensor::expand_null_slots`]: `self` is `d_pool [T, E + n_null]`; returns
    /// (`d_z [T, E]`, `d_null [T, 1]` = sum over the null columns).
    pub fn reduce_null_slots(&self, n_real: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "reduce_null_slots";
        let (t, w) = self.dims2().map_err(|_| self.rank_error(OP, "d_pool", 2))?;
        if n_real > w {
            return Err(invalid(OP, "n_real", n_real, "must be <= the pool width"));
        }
        let d = self.cpu_f32(OP, "d_pool")?;
        let (dz, dn) = kernel::reduce_null_slots(&d, n_real, w);
        Ok((
            Tensor::cpu_f32_from(dz, [t, n_real]),
            Tensor::cpu_f32_from(dn, [t, 1]),
        ))
    }

    /// `self` is `idx [T, k]` (i32 pool slots); result `[T, k]` f32: 1 where the slot is a
    /// real expert (`< n_real`), 0 where it is a null slot.
    pub fn real_slot_mask(&self, n_real: usize) -> Result<Tensor> {
        const OP: &str = "real_slot_mask";
        self.dims2().map_err(|_| self.rank_error(OP, "idx", 2))?;
        let ids = self.cpu_i32(OP, "idx")?;
        Ok(Tensor::cpu_f32_from(
            kernel::real_slot_mask(ids, n_real),
            self.shape(),
        ))
    }

    /// Row normalisation of gates `g [T, k]`: `g / (Σ_row g + eps)` (sum in f64).
    pub fn normalize_rows(&self, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows";
        let (_, k) = self.dims2().map_err(|_| self.rank_error(OP, "g", 2))?;
        let g = self.cpu_f32(OP, "g")?;
        Ok(Tensor::cpu_f32_from(
            kernel::normalize_rows(&g, k, eps),
            self.shape(),
        ))
    }

    /// Backward of [`Tensor::normalize_rows`]; `self` is the INPUT `g`. With
    /// `S = Σ g + eps` and `n = g / S`: `dg_i = (dn_i − Σ_j dn_j n_j) / S`, written fresh.
    pub fn normalize_rows_backward(&self, d_n: &Tensor, eps: f32) -> Result<Tensor> {
        const OP: &str = "normalize_rows_backward";
        self.same_shape(OP, d_n)?;
        let (_, k) = self.dims2().map_err(|_| self.rank_error(OP, "g", 2))?;
        let g = self.cpu_f32(OP, "g")?;
        let dn = d_n.cpu_f32(OP, "d_n")?;
        Ok(Tensor::cpu_f32_from(
            kernel::normalize_rows_backward(&g, &dn, k, eps),
            self.shape(),
        ))
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
        check_slots(OP, self, i32::MAX as usize)?;
        if gates.dims() != self.dims() {
            return Err(shape_err(
                OP,
                self,
                gates,
                "gates must have idx's shape [T, k]",
            ));
        }
        let ids = self.cpu_i32(OP, "idx")?;
        let g = gates.cpu_f32(OP, "gates")?;
        Ok(Tensor::cpu_f32_from(
            kernel::capacity_keep(ids, &g, n_real, capacity, order == KeepOrder::HighestGate),
            self.shape(),
        ))
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
        let (t, k) = check_slots(OP, self, n_slots)?;
        if seg_tokens == 0 || !t.is_multiple_of(seg_tokens) {
            return Err(invalid(
                OP,
                "seg_tokens",
                seg_tokens,
                "must be >= 1 and divide T",
            ));
        }
        let kd = match keep {
            Some(w) => {
                if w.dims() != self.dims() {
                    return Err(shape_err(OP, self, w, "keep must have idx's shape [T, k]"));
                }
                Some(w.cpu_f32(OP, "keep")?)
            }
            None => None,
        };
        let ids = self.cpu_i32(OP, "idx")?;
        Ok(Tensor::cpu_f32_from(
            kernel::slot_counts(ids, k, kd.as_deref(), n_slots, seg_tokens),
            [t / seg_tokens, n_slots],
        ))
    }

    /// Stable permutation of the kept assignments by expert: `self` is `idx [T, k]`, `keep
    /// [T, k]` from [`Tensor::capacity_keep`]. Null slots and dropped assignments get no row.
    pub fn sort_by_expert(&self, keep: &Tensor, n_real: usize) -> Result<ExpertPermutation> {
        const OP: &str = "sort_by_expert";
        self.same_device(OP, keep)?;
        let (_, k) = check_slots(OP, self, i32::MAX as usize)?;
        if keep.dims() != self.dims() {
            return Err(shape_err(
                OP,
                self,
                keep,
                "keep must have idx's shape [T, k]",
            ));
        }
        let ids = self.cpu_i32(OP, "idx")?;
        let kd = keep.cpu_f32(OP, "keep")?;
        let (token, assignment, counts) = kernel::sort_by_expert(ids, k, &kd, n_real);
        let r = token.len();
        Ok(ExpertPermutation {
            token: Tensor::cpu_i32_from(token, [r]),
            assignment: Tensor::cpu_i32_from(assignment, [r]),
            counts: Tensor::cpu_i32_from(counts, [n_real]),
        })
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
        let (t, d) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        if idx.dim(0)? != t {
            return Err(shape_err(
                OP,
                self,
                idx,
                "x [T, d] and idx [T, k] need the same T",
            ));
        }
        let perm = idx.sort_by_expert(keep, n_real)?;
        let x = self.cpu_f32(OP, "x")?;
        let ids = perm.token.cpu_i32(OP, "token")?;
        let rows = crate::cpu::index::gather_rows(&x, d, ids);
        let r = ids.len();
        Ok((Tensor::cpu_f32_from(rows, [r, d]), perm))
    }

    /// Static expert buffers: `self` is rows `[Σ counts, d]` grouped by expert, `counts [G]`
    /// i32 (each ≤ `capacity`); result `[G · capacity, d]` with group `g` at rows
    /// `g·capacity ..` followed by zero pad rows.
    pub fn pad_groups(&self, counts: &Tensor, capacity: usize) -> Result<Tensor> {
        const OP: &str = "pad_groups";
        let (r, d) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        let c = counts.cpu_i32(OP, "counts")?;
        let total: usize = c.iter().map(|&v| v.max(0) as usize).sum();
        if total != r || c.iter().any(|&v| v < 0 || v as usize > capacity) {
            return Err(shape_err(
                OP,
                self,
                counts,
                "counts must be in 0..=capacity and sum to the rows of x",
            ));
        }
        let x = self.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::pad_groups(&x, d, c, capacity),
            [c.len() * capacity, d],
        ))
    }

    /// Inverse of [`Tensor::pad_groups`]: `self` is `[G · capacity, d]`; drops the pad rows.
    /// `rows` is Σ counts, passed by the caller (it is the row count of the unpadded buffer
    /// it padded) so that the output shape never needs the counts on the host; the backend
    /// checks it.
    pub fn unpad_groups(&self, counts: &Tensor, capacity: usize, rows: usize) -> Result<Tensor> {
        const OP: &str = "unpad_groups";
        let (r, d) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        let c = counts.cpu_i32(OP, "counts")?;
        let total: usize = c.iter().map(|&v| v.max(0) as usize).sum();
        if r != c.len() * capacity
            || total != rows
            || c.iter().any(|&v| v < 0 || v as usize > capacity)
        {
            return Err(shape_err(
                OP,
                self,
                counts,
                "x must be [G·capacity, d], counts in 0..=capacity summing to rows",
            ));
        }
        let x = self.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::unpad_groups(&x, d, c, capacity),
            [rows, d],
        ))
    }

    /// Aux-loss-free balancing step (Loss-Free Balancing, arXiv 2408.15664): `self` is
    /// per-expert token counts `c [E]` (f32); returns `Δb [E]` with
    /// `Δb_i = rate · sign(mean(c) − c_i)` (sign(0) = 0), and, if `centre`, `mean(Δb)`
    /// subtracted so the bias stays centred. Add it to the bias: `b ← b + Δb`.
    pub fn expert_bias_step(&self, rate: f32, centre: bool) -> Result<Tensor> {
        const OP: &str = "expert_bias_step";
        self.expect_rank(OP, "counts", 1)?;
        let c = self.cpu_f32(OP, "counts")?;
        Ok(Tensor::cpu_f32_from(
            kernel::expert_bias_step(&c, rate, centre),
            self.shape(),
        ))
    }
}
