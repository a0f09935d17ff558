//! Index and shape ops: row gather (`index_select`), deterministic row scatter-add
//! (`index_add_rows`), per-row column gather/scatter (`gather_cols`, `scatter_cols`),
//! `narrow`, `cat`, `split`, `permute`, `transpose2d`.
//!
//! Index tensors are `I32`. The CPU backend checks every index against its bound and
//! reports the first bad one as [`Error::IndexOutOfRange`]. Shape ops work on every dtype.

use crate::cpu::index as kernel;
use crate::tensor::{map_cpu_view, CpuView};
use crate::{Error, Result, Shape, Tensor};

/// Checks `0 <= idx[i] < bound` for all i.
fn check_indices(op: &'static str, idx: &[i32], bound: usize) -> Result<()> {
    if let Some((position, &index)) = idx
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
    Ok(())
}

impl Tensor {
    /// Row gather: `out[r] = self[idx[r]]` for `self [N, ..]` and `idx [R]` (i32); result
    /// `[R, ..]`, any dtype.
    pub fn index_select(&self, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_select";
        self.same_device(OP, idx)?;
        idx.expect_rank(OP, "idx", 1)?;
        let (&n, rest) = self
            .dims()
            .split_first()
            .ok_or_else(|| self.rank_error(OP, "x", 1))?;
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, n)?;
        let row: usize = rest.iter().product();
        let out = map_cpu_view!(self.cpu_view(OP)?, v => kernel::gather_rows(v, row, ids));
        let mut shape = vec![ids.len()];
        shape.extend_from_slice(rest);
        Ok(Tensor::from_cpu(out, shape.into()))
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
        let (&m, rest) = self
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
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, m)?;
        let w = weights.map(|w| w.cpu_f32(OP, "weights")).transpose()?;
        let row: usize = rest.iter().product();
        let s = src.cpu_f32(OP, "src")?;
        let d = self.cpu_f32_mut(OP)?;
        kernel::index_add_rows_into(d, row, ids, &s, w.as_deref());
        Ok(())
    }

    /// Per-row gather: `out[n, j] = self[n, idx[n, j]]` for `self [N, E]`, `idx [N, k]`.
    pub fn gather_cols(&self, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_cols";
        self.same_device(OP, idx)?;
        let (n, e) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        let (n2, k) = idx.dims2().map_err(|_| idx.rank_error(OP, "idx", 2))?;
        if n != n2 {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: idx.dims().to_vec(),
                rule: "x and idx must have the same number of rows",
            });
        }
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, e)?;
        let x = self.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::gather_cols(&x, e, ids, k),
            [n, k],
        ))
    }

    /// Per-row scatter-add: `self` is `src [N, k]`; returns `out [N, n_cols]`, zero except
    /// `out[n, idx[n, j]] += src[n, j]` (duplicates add in increasing `j`). The backward of
    /// [`Tensor::gather_cols`].
    pub fn scatter_cols(&self, idx: &Tensor, n_cols: usize) -> Result<Tensor> {
        const OP: &str = "scatter_cols";
        self.same_shape(OP, idx)?;
        let (n, k) = self.dims2().map_err(|_| self.rank_error(OP, "src", 2))?;
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, n_cols)?;
        let s = self.cpu_f32(OP, "src")?;
        Ok(Tensor::cpu_f32_from(
            kernel::scatter_cols(&s, ids, k, n_cols),
            [n, n_cols],
        ))
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
        let out = map_cpu_view!(self.cpu_view(OP)?, v => kernel::narrow(v, outer, size, inner, start, len));
        Ok(Tensor::from_cpu(out, shape.into()))
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
        let (outer, _, inner) = first.shape().split_at_dim(OP, dim)?;
        let mut sizes = Vec::with_capacity(tensors.len());
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
            sizes.push(t.dims()[dim]);
        }
        macro_rules! pieces {
            ($variant:ident) => {{
                let mut p = Vec::with_capacity(tensors.len());
                for (t, &sz) in tensors.iter().zip(&sizes) {
                    match t.cpu_view(OP)? {
                        CpuView::$variant(v) => p.push((v, sz)),
                        _ => unreachable!("dtypes checked equal above"),
                    }
                }
                crate::storage::CpuStorage::$variant(kernel::cat(&p, outer, inner))
            }};
        }
        let out = match first.dtype() {
            crate::DType::F32 => pieces!(F32),
            crate::DType::BF16 => pieces!(BF16),
            crate::DType::I32 => pieces!(I32),
        };
        let mut shape = first.dims().to_vec();
        shape[dim] = sizes.iter().sum();
        Ok(Tensor::from_cpu(out, shape.into()))
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
        let out = map_cpu_view!(self.cpu_view(OP)?, v => kernel::permute(v, self.dims(), perm));
        let shape: Vec<usize> = perm.iter().map(|&p| self.dims()[p]).collect();
        Ok(Tensor::from_cpu(out, Shape::from(shape)))
    }

    /// Transpose of a rank-2 tensor (a copy).
    pub fn transpose2d(&self) -> Result<Tensor> {
        self.expect_rank("transpose2d", "x", 2)?;
        self.permute(&[1, 0])
    }
}
