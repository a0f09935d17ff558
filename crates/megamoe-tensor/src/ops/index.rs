//! Index and shape ops: row gather (`index_select`), deterministic row scatter-add
//! (`index_add_rows`), per-row column gather/scatter (`gather_cols`, `scatter_cols`),
//! `narrow`, `cat`, `split`, `permute`, `transpose2d`.
//!
//! Index tensors are `I32`. The CPU backend checks every index against its bound and
//! reports the first bad one as [`Error::IndexOutOfRange`]. Shape ops work on every dtype.

use crate::{Error, Result, Tensor};

/// The index and data-movement kernel family of a [`Backend`](crate::backend::Backend).
/// Index tensors are i32; ids out of range are the backend's to detect (the CPU backend
/// reports the first as [`Error::IndexOutOfRange`]).
pub trait IndexKernels {
    /// `out[r] = x[idx[r]]` for `x [N, ..]`, `idx [R]`: `[R, ..]`, any dtype.
    fn index_select(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor>;
    /// In place `dst[idx[r]] += weights[r] · src[r]` (`dst [M, ..]` f32, `src [R, ..]`),
    /// each destination adding its sources in increasing `r`.
    fn index_add_rows(
        &self,
        dst: &mut Tensor,
        idx: &Tensor,
        src: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<()>;
    /// `out[n, j] = x[n, idx[n, j]]` for `x [N, E]`, `idx [N, k]`.
    fn gather_cols(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor>;
    /// `out [N, n_cols]` zero but `out[n, idx[n, j]] += src[n, j]` for `src`, `idx [N, k]`.
    fn scatter_cols(&self, src: &Tensor, idx: &Tensor, n_cols: usize) -> Result<Tensor>;
    /// A copy of `len` entries of dimension `dim` from `start` (any dtype).
    fn narrow_copy(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor>;
    /// Concatenation along `dim` (equal dtypes and other dims, checked by the caller).
    fn cat(&self, tensors: &[&Tensor], dim: usize) -> Result<Tensor>;
    /// Dimensions reordered by `perm` (a permutation of `0..rank`, rank ≥ 1), any dtype.
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor>;
}

impl Tensor {
    /// Row gather: `out[r] = self[idx[r]]` for `self [N, ..]` and `idx [R]` (i32); result
    /// `[R, ..]`, any dtype.
    pub fn index_select(&self, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_select";
        self.same_device(OP, idx)?;
        idx.expect_rank(OP, "idx", 1)?;
        if self.rank() == 0 {
            return Err(self.rank_error(OP, "x", 1));
        }
        self.backend().index_select(self, idx)
    }

    /// Deterministic scatter-add of rows: returns `self` (`[M, ..]`) plus, for each source row
    /// `r` of `src [R, ..]`, `weights[r] · src[r]` added to row `idx[r]` (`idx [R]` i32,
    /// `weights [R]` optional). Each destination adds its sources in increasing `r`, so the
    /// result does not depend on thread count. Result f32, a fresh buffer; to accumulate
    /// into an existing buffer use [`Tensor::index_add_rows_acc`].
    pub fn index_add_rows(
        &self,
        idx: &Tensor,
        src: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut out = self.clone();
        out.index_add_rows_acc(idx, src, weights)?;
        Ok(out)
    }

    /// In place: `self[idx[r]] += weights[r] · src[r]` for every source row `r` (see
    /// [`Tensor::index_add_rows`] for shapes and order). Only destination rows that receive a
    /// source are touched, so an embedding gradient `[V, H]` costs O(rows), not O(V·H).
    /// Copy-on-write if `self`'s buffer is shared.
    pub fn index_add_rows_acc(
        &mut self,
        idx: &Tensor,
        src: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<()> {
        const OP: &str = "index_add_rows";
        self.same_device(OP, src)?;
        self.same_device(OP, idx)?;
        idx.expect_rank(OP, "idx", 1)?;
        let (_, rest) = self
            .dims()
            .split_first()
            .ok_or_else(|| self.rank_error(OP, "dst", 1))?;
        let r = idx.numel();
        let mut want = vec![r];
        want.extend_from_slice(rest);
        if src.dims() != want.as_slice() {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: src.dims().to_vec(),
                rule: "src must be [R, ..] with dst's trailing dims and R = len(idx)",
            });
        }
        if let Some(w) = weights {
            if w.dims() != [r] {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    lhs: w.dims().to_vec(),
                    rhs: vec![r],
                    rule: "weights must be [R]",
                });
            }
        }
        let src = self.unaliased(src)?;
        let weights = weights.map(|w| self.unaliased(w)).transpose()?;
        self.backend()
            .index_add_rows(self, idx, &src, weights.as_deref())
    }

    /// Per-row gather: `out[n, j] = self[n, idx[n, j]]` for `self [N, E]`, `idx [N, k]`.
    pub fn gather_cols(&self, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_cols";
        self.same_device(OP, idx)?;
        let (n, _) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        let (n2, _) = idx.dims2().map_err(|_| idx.rank_error(OP, "idx", 2))?;
        if n != n2 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: idx.dims().to_vec(),
                rule: "x and idx must have the same number of rows",
            });
        }
        self.backend().gather_cols(self, idx)
    }

    /// Per-row scatter-add: `self` is `src [N, k]`; returns `out [N, n_cols]`, zero except
    /// `out[n, idx[n, j]] += src[n, j]` (duplicates add in increasing `j`). The backward of
    /// [`Tensor::gather_cols`].
    pub fn scatter_cols(&self, idx: &Tensor, n_cols: usize) -> Result<Tensor> {
        const OP: &str = "scatter_cols";
        self.same_shape(OP, idx)?;
        self.dims2().map_err(|_| self.rank_error(OP, "src", 2))?;
        self.backend().scatter_cols(self, idx, n_cols)
    }

    /// `len` entries of dimension `dim` starting at `start` (any dtype). A view sharing the
    /// buffer (no copy) when the kept block is contiguous: `dim` is 0, or every dimension
    /// before `dim` has size 1; otherwise a copy.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        const OP: &str = "narrow";
        let (outer, size, inner) = self.shape().split_at_dim(OP, dim)?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "start+len",
                value: format!("{start}+{len}"),
                rule: "must be <= the size of dimension dim",
            });
        }
        let mut shape = self.dims().to_vec();
        shape[dim] = len;
        if outer == 1 || len == size {
            return self.view(start * inner, shape);
        }
        self.backend().narrow_copy(self, dim, start, len)
    }

    /// Concatenation along `dim`; all tensors share dtype, device and every other dim.
    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        const OP: &str = "cat";
        let first = tensors.first().ok_or(Error::InvalidArgument {
            op: OP,
            arg: "tensors",
            value: "[]".into(),
            rule: "needs at least one tensor",
        })?;
        first.shape().split_at_dim(OP, dim)?;
        for t in tensors {
            first.same_device(OP, t)?;
            let same_rest = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b);
            if !same_rest || t.dtype() != first.dtype() {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    lhs: first.dims().to_vec(),
                    rhs: t.dims().to_vec(),
                    rule: "all tensors need the same dtype and the same dims except `dim`",
                });
            }
        }
        first.backend().cat(tensors, dim)
    }

    /// Splits along `dim` into pieces of the given sizes (which must sum to the dim's size).
    pub fn split(&self, dim: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let size = self.shape().dim("split", dim)?;
        let total: usize = sizes.iter().sum();
        if total != size {
            return Err(Error::InvalidArgument {
                op: "split",
                arg: "sum(sizes)",
                value: total.to_string(),
                rule: "must equal the size of dimension dim",
            });
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &len in sizes {
            out.push(self.narrow(dim, start, len)?);
            start += len;
        }
        Ok(out)
    }

    /// Reorders dimensions: output dim `i` is input dim `perm[i]` (a copy; any dtype).
    /// `[B, T, H, D] → [B, H, T, D]` is `permute(&[0, 2, 1, 3])`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        const OP: &str = "permute";
        let rank = self.rank();
        let mut seen = vec![false; rank];
        let valid = perm.len() == rank
            && perm
                .iter()
                .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "perm",
                value: format!("{perm:?}"),
                rule: "must be a permutation of 0..rank",
            });
        }
        if rank == 0 {
            return Ok(self.clone());
        }
        self.backend().permute(self, perm)
    }

    /// Transpose of a rank-2 tensor (a copy).
    pub fn transpose2d(&self) -> Result<Tensor> {
        self.expect_rank("transpose2d", "x", 2)?;
        self.permute(&[1, 0])
    }
}
