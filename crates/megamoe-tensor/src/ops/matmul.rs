//! Matrix products: dense 2-D (`matmul`, `matmul_acc`), batched (`bmm`) and grouped over
//! ragged row groups (`grouped_matmul`, `grouped_matmul_wgrad` and their accumulating forms
//! `grouped_matmul_acc`, `grouped_matmul_wgrad_acc`), the MoE expert bank's GEMMs. Row
//! groups are device tensors ([`RowGroups`]), never host values.
//!
//! Transposes are flags, not copies: `trans_a` means `a` is stored `[K, M]` and used as its
//! transpose. All products are f32 (bf16 operands are widened first).

use crate::ops::groups::RowGroups;
use crate::{Error, Result, Tensor};

/// The GEMM kernel family of a [`Backend`](crate::backend::Backend); shapes as in the
/// matching [`Tensor`] ops, validated by them. `beta` scales the existing output of an
/// `_acc` kernel before the product is added (`0` overwrites, whatever was there).
pub trait MatmulKernels {
    /// `op(a) · op(b)`, `[M, N]` f32.
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor>;
    /// In place `out ← beta · out + op(a) · op(b)`.
    fn matmul_acc(
        &self,
        out: &mut Tensor,
        a: &Tensor,
        b: &Tensor,
        trans_a: bool,
        trans_b: bool,
        beta: f32,
    ) -> Result<()>;
    /// Batched `op(a[i]) · op(b[i])` for `a [B, ., .]` and `b [B, ., .]` or rank-2 `b`
    /// shared by every batch entry: `[B, M, N]`.
    fn bmm(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor>;
    /// Rows of group `g` of `x [R, K]` times `op(w[g])` (`w [G, ., .]`); rows in no group
    /// are 0: `[R, N]`.
    fn grouped_matmul(
        &self,
        x: &Tensor,
        groups: &RowGroups,
        w: &Tensor,
        trans_w: bool,
    ) -> Result<Tensor>;
    /// In place `out ← beta · out + grouped_matmul(x, groups, w, trans_w)` on the groups'
    /// rows (rows in no group untouched).
    fn grouped_matmul_acc(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        groups: &RowGroups,
        w: &Tensor,
        trans_w: bool,
        beta: f32,
    ) -> Result<()>;
    /// `dw[g] = dy[rows of g]ᵀ · x[rows of g]`: `[G, N, K]`.
    fn grouped_matmul_wgrad(&self, dy: &Tensor, x: &Tensor, groups: &RowGroups) -> Result<Tensor>;
    /// In place `out ← beta · out + grouped_matmul_wgrad(dy, x, groups)`.
    fn grouped_matmul_wgrad_acc(
        &self,
        out: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        groups: &RowGroups,
        beta: f32,
    ) -> Result<()>;
    /// `w` as the operand a GEMM reads ([`Tensor::as_gemm_weight`]); by default `w` itself
    /// (the backend reads its weights as they are).
    fn gemm_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(w.clone())
    }
}

/// Logical `(rows, cols)` of a rank-2 operand stored `[d0, d1]`, transposed if `trans`.
fn logical(op: &'static str, arg: &'static str, t: &Tensor, trans: bool) -> Result<(usize, usize)> {
    let (r, c) = match t.dims() {
        &[r, c] => (r, c),
        _ => return Err(t.rank_error(op, arg, 2)),
    };
    Ok(if trans { (c, r) } else { (r, c) })
}

fn inner_mismatch(op: &'static str, a: &Tensor, b: &Tensor) -> Error {
    Error::ShapeMismatch {
        op,
        lhs: a.dims().to_vec(),
        rhs: b.dims().to_vec(),
        rule: "inner dimensions (after transposes) must agree",
    }
}

impl Tensor {
    /// This weight as the operand a GEMM reads it: on a GPU in bf16-matmul mode an f32
    /// weight's bf16 copy (a registered weight's cached copy, else a cast), otherwise the
    /// weight itself. A GEMM reads such an operand as it is, so a fused operand built from
    /// them (`Tensor::cat` of two weights' operands) holds the bits the GEMM would have
    /// read from the fused f32 weight, without a cast of the fused copy.
    pub fn as_gemm_weight(&self) -> Result<Tensor> {
        self.backend().gemm_weight(self)
    }

    /// `op(a) · op(b)` for rank-2 `a`, `b`: `a` is `[M, K]` (stored `[K, M]` if `trans_a`),
    /// `b` is `[K, N]` (stored `[N, K]` if `trans_b`); the result is `[M, N]` f32.
    ///
    /// A linear layer `y = x Wᵀ` with `W [out, in]` is `x.matmul(&w, false, true)`; its input
    /// gradient `dy.matmul(&w, false, false)` and weight gradient `dy.matmul(&x, true, false)`.
    pub fn matmul(&self, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "matmul";
        self.same_device(OP, b)?;
        let (_, k) = logical(OP, "a", self, trans_a)?;
        let (k2, _) = logical(OP, "b", b, trans_b)?;
        if k != k2 {
            return Err(inner_mismatch(OP, self, b));
        }
        self.backend().matmul(self, b, trans_a, trans_b)
    }

    /// In place: `self ← beta·self + op(a)·op(b)` (`self` is `[M, N]`). `beta = 1` accumulates
    /// weight gradients across micro-batches, `beta = 0` overwrites (without reading `self`,
    /// so NaNs in it do not propagate). Copy-on-write if `self`'s buffer is shared. A `self`
    /// that is exactly one deferred-zero range of a write-through buffer (`defer_zero`) is
    /// overwritten whatever `beta`.
    pub fn matmul_acc(
        &mut self,
        a: &Tensor,
        b: &Tensor,
        trans_a: bool,
        trans_b: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "matmul_acc";
        self.same_device(OP, a)?;
        self.same_device(OP, b)?;
        let (m, k) = logical(OP, "a", a, trans_a)?;
        let (k2, n) = logical(OP, "b", b, trans_b)?;
        if k != k2 {
            return Err(inner_mismatch(OP, a, b));
        }
        if self.dims() != [m, n] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: vec![m, n],
                rule: "out must be [M, N] of op(a)·op(b)",
            });
        }
        let (a, b) = (self.unaliased(a)?, self.unaliased(b)?);
        // Deferred zeros (a gradient's first contribution of a step) are overwritten.
        let beta = if self.take_deferred() { 0.0 } else { beta };
        self.backend()
            .matmul_acc(self, &a, &b, trans_a, trans_b, beta)
    }

    /// Batched product: `a [B, M, K]` (stored `[B, K, M]` if `trans_a`) times `b [B, K, N]`
    /// (stored `[B, N, K]` if `trans_b`), or a rank-2 `b` shared by every batch entry;
    /// result `[B, M, N]`.
    pub fn bmm(&self, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "bmm";
        self.same_device(OP, b)?;
        let (batch, a0, a1) = match self.dims() {
            &[bb, x, y] => (bb, x, y),
            _ => return Err(self.rank_error(OP, "a", 3)),
        };
        let (_, k) = if trans_a { (a1, a0) } else { (a0, a1) };
        let (b0, b1) = match *b.dims() {
            [bb, x, y] if bb == batch => (x, y),
            [x, y] => (x, y),
            _ => {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    lhs: self.dims().to_vec(),
                    rhs: b.dims().to_vec(),
                    rule: "b must be [B, ., .] with a's batch size B, or rank 2",
                })
            }
        };
        let k2 = if trans_b { b1 } else { b0 };
        if k != k2 {
            return Err(inner_mismatch(OP, self, b));
        }
        self.backend().bmm(self, b, trans_a, trans_b)
    }

    /// Grouped GEMM: `self` is `x [R, K]` whose rows are cut into the row `groups` (device
    /// tensors, see [`RowGroups`]; `R` is the static row bound); group `g` is multiplied by
    /// `w[g]`, where `w` is `[G, N, K]` used transposed if `trans_w` (`y_g = x_g w_gᵀ`, the
    /// Linear convention) or `[G, K, N]` otherwise. Result `[R, N]`; rows outside every
    /// group are zero.
    ///
    /// Input gradient of `y = grouped_matmul(x, groups, w, true)` is
    /// `grouped_matmul(dy, groups, w, false)`.
    pub fn grouped_matmul(&self, groups: &RowGroups, w: &Tensor, trans_w: bool) -> Result<Tensor> {
        const OP: &str = "grouped_matmul";
        grouped_dims(OP, self, groups, w, trans_w)?;
        self.backend().grouped_matmul(self, groups, w, trans_w)
    }

    /// In place: `self ← beta·self + grouped_matmul(x, groups, w, trans_w)`, `self` being
    /// `[R, N]` (rows outside every group: `beta·self`). Used to sum two products into one
    /// buffer (e.g. the SwiGLU input gradient `d_up·W_up + d_gate·W_gate`) without a
    /// temporary. `beta = 0` overwrites without reading `self`. Copy-on-write if `self`'s
    /// buffer is shared.
    pub fn grouped_matmul_acc(
        &mut self,
        x: &Tensor,
        groups: &RowGroups,
        w: &Tensor,
        trans_w: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul_acc";
        self.same_device(OP, x)?;
        let (rows, n, _) = grouped_dims(OP, x, groups, w, trans_w)?;
        check_out(OP, self, &[rows, n])?;
        let (x, w) = (self.unaliased(x)?, self.unaliased(w)?);
        self.backend()
            .grouped_matmul_acc(self, &x, groups, &w, trans_w, beta)
    }

    /// Weight gradient of [`Tensor::grouped_matmul`] with `trans_w = true`:
    /// `dw[g] = dy_gᵀ x_g`, where `dy [R, N]` and `x [R, K]` share the row groups. Result
    /// `[G, N, K]`; a group with zero rows gets a zero gradient. (For the `[G, K, N]` layout,
    /// call `grouped_matmul_wgrad(x, dy, groups)`, which gives `[G, K, N]`.)
    pub fn grouped_matmul_wgrad(dy: &Tensor, x: &Tensor, groups: &RowGroups) -> Result<Tensor> {
        const OP: &str = "grouped_matmul_wgrad";
        wgrad_dims(OP, dy, x, groups)?;
        dy.backend().grouped_matmul_wgrad(dy, x, groups)
    }

    /// In place: `self[g] ← beta·self[g] + dy_gᵀ x_g` for `self [G, N, K]` — the
    /// accumulating form of [`Tensor::grouped_matmul_wgrad`], writing the product straight
    /// into a gradient buffer (no `[G, N, K]` temporary, no separate add pass). `beta = 1`
    /// accumulates, `beta = 0` overwrites without reading `self`; a group with zero rows adds
    /// nothing. Copy-on-write if `self`'s buffer is shared. A `self` that is exactly one
    /// deferred-zero range of a write-through buffer (`defer_zero`) is overwritten whatever
    /// `beta`.
    pub fn grouped_matmul_wgrad_acc(
        &mut self,
        dy: &Tensor,
        x: &Tensor,
        groups: &RowGroups,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul_wgrad_acc";
        self.same_device(OP, dy)?;
        let (_, n, k) = wgrad_dims(OP, dy, x, groups)?;
        check_out(OP, self, &[groups.len(), n, k])?;
        let (dy, x) = (self.unaliased(dy)?, self.unaliased(x)?);
        // Deferred zeros (a gradient's first contribution of a step) are overwritten.
        let beta = if self.take_deferred() { 0.0 } else { beta };
        self.backend()
            .grouped_matmul_wgrad_acc(self, &dy, &x, groups, beta)
    }
}

/// `(R, N, K)` of the grouped product `x [R, K]` · `w[g]` after checking ranks, devices,
/// the row groups and the inner dimension (`w` is `[G, N, K]` when `trans_w`, else `[G, K, N]`).
/// The one shape preamble of the grouped family: the op layer and every backend call it.
pub(crate) fn grouped_dims(
    op: &'static str,
    x: &Tensor,
    groups: &RowGroups,
    w: &Tensor,
    trans_w: bool,
) -> Result<(usize, usize, usize)> {
    x.same_device(op, w)?;
    x.same_device(op, groups.sizes())?;
    let (rows, k) = match x.dims() {
        &[r, k] => (r, k),
        _ => return Err(x.rank_error(op, "x", 2)),
    };
    let (g, w1, w2) = match w.dims() {
        &[g, a, b] => (g, a, b),
        _ => return Err(w.rank_error(op, "w", 3)),
    };
    check_groups(op, groups, g)?;
    let (wk, n) = if trans_w { (w2, w1) } else { (w1, w2) };
    if wk != k {
        return Err(inner_mismatch(op, x, w));
    }
    Ok((rows, n, k))
}

/// `(R, N, K)` of the weight gradient `dy_gᵀ x_g` after checking `dy [R, N]`, `x [R, K]`
/// and the row groups (the op layer and every backend call it).
pub(crate) fn wgrad_dims(
    op: &'static str,
    dy: &Tensor,
    x: &Tensor,
    groups: &RowGroups,
) -> Result<(usize, usize, usize)> {
    dy.same_device(op, x)?;
    let (rows, n) = match dy.dims() {
        &[r, n] => (r, n),
        _ => return Err(dy.rank_error(op, "dy", 2)),
    };
    let (rows_x, k) = match x.dims() {
        &[r, k] => (r, k),
        _ => return Err(x.rank_error(op, "x", 2)),
    };
    if rows != rows_x {
        return Err(Error::ShapeMismatch {
            op,
            lhs: dy.dims().to_vec(),
            rhs: x.dims().to_vec(),
            rule: "dy and x must have the same number of rows",
        });
    }
    check_groups(op, groups, groups.len())?;
    dy.same_device(op, groups.sizes())?;
    Ok((rows, n, k))
}

/// An in-place output must already have the product's shape.
fn check_out(op: &'static str, out: &Tensor, want: &[usize]) -> Result<()> {
    if out.dims() != want {
        return Err(Error::ShapeMismatch {
            op,
            lhs: out.dims().to_vec(),
            rhs: want.to_vec(),
            rule: "the in-place output must have the product's shape",
        });
    }
    Ok(())
}

/// `groups` must have one entry per weight group and live on the operands' device (their
/// values are checked by the backend, see [`RowGroups`]).
fn check_groups(op: &'static str, groups: &RowGroups, expected: usize) -> Result<()> {
    if groups.len() != expected {
        return Err(Error::InvalidArgument {
            op,
            arg: "groups.len()",
            value: groups.len().to_string(),
            rule: "must equal the number of weight groups G",
        });
    }
    Ok(())
}
