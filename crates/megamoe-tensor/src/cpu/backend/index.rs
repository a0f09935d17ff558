//! [`IndexKernels`] on the CPU. Ids are checked on the host before any write: the first
//! bad one is an [`Error::IndexOutOfRange`].

use crate::backend::CpuBackend;
use crate::cpu::index as kernel;
use crate::ops::index::IndexKernels;
use crate::storage::CpuStorage;
use crate::tensor::{map_cpu_view, CpuView};
use crate::{DType, Error, Result, Shape, Tensor};

/// Checks `0 <= idx[i] < bound` for all i.
pub(crate) fn check_indices(op: &'static str, idx: &[i32], bound: usize) -> Result<()> {
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

impl IndexKernels for CpuBackend {
    fn index_select(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_select";
        let (&n, rest) = x
            .dims()
            .split_first()
            .ok_or_else(|| x.rank_error(OP, "x", 1))?;
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, n)?;
        let row: usize = rest.iter().product();
        let out = map_cpu_view!(x.cpu_view(OP)?, v => kernel::gather_rows(v, row, ids));
        let mut shape = vec![ids.len()];
        shape.extend_from_slice(rest);
        Ok(Tensor::from_cpu(out, shape.into()))
    }

    fn index_add_rows(
        &self,
        dst: &mut Tensor,
        idx: &Tensor,
        src: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<()> {
        const OP: &str = "index_add_rows";
        let m = dst.dims().first().copied().unwrap_or(0);
        let row: usize = dst.dims().iter().skip(1).product();
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, m)?;
        let w = weights.map(|w| w.cpu_f32(OP, "weights")).transpose()?;
        let s = src.cpu_f32(OP, "src")?;
        let d = dst.cpu_f32_mut(OP)?;
        kernel::index_add_rows_into(d, row, ids, &s, w.as_deref());
        Ok(())
    }

    fn gather_cols(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_cols";
        let (n, e) = x.dims2()?;
        let (_, k) = idx.dims2()?;
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, e)?;
        let xv = x.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::gather_cols(&xv, e, ids, k),
            [n, k],
        ))
    }

    fn scatter_cols(&self, src: &Tensor, idx: &Tensor, n_cols: usize) -> Result<Tensor> {
        const OP: &str = "scatter_cols";
        let (n, k) = src.dims2()?;
        let ids = idx.cpu_i32(OP, "idx")?;
        check_indices(OP, ids, n_cols)?;
        let s = src.cpu_f32(OP, "src")?;
        Ok(Tensor::cpu_f32_from(
            kernel::scatter_cols(&s, ids, k, n_cols),
            [n, n_cols],
        ))
    }

    fn narrow_copy(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        const OP: &str = "narrow";
        let (outer, size, inner) = x.shape().split_at_dim(OP, dim)?;
        let mut shape = x.dims().to_vec();
        shape[dim] = len;
        let out =
            map_cpu_view!(x.cpu_view(OP)?, v => kernel::narrow(v, outer, size, inner, start, len));
        Ok(Tensor::from_cpu(out, shape.into()))
    }

    fn cat(&self, tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        const OP: &str = "cat";
        let Some(first) = tensors.first() else {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "tensors",
                value: "[]".into(),
                rule: "needs at least one tensor",
            });
        };
        let (outer, _, inner) = first.shape().split_at_dim(OP, dim)?;
        let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[dim]).collect();
        macro_rules! pieces {
            ($variant:ident) => {{
                let mut p = Vec::with_capacity(tensors.len());
                for (t, &sz) in tensors.iter().zip(&sizes) {
                    match t.cpu_view(OP)? {
                        CpuView::$variant(v) => p.push((v, sz)),
                        _ => {
                            return Err(Error::DTypeMismatch {
                                op: OP,
                                arg: "tensors",
                                expected: "one dtype for all",
                                got: t.dtype(),
                            })
                        }
                    }
                }
                CpuStorage::$variant(kernel::cat(&p, outer, inner))
            }};
        }
        let out = match first.dtype() {
            DType::F32 => pieces!(F32),
            DType::BF16 => pieces!(BF16),
            DType::I32 => pieces!(I32),
        };
        let mut shape = first.dims().to_vec();
        shape[dim] = sizes.iter().sum();
        Ok(Tensor::from_cpu(out, shape.into()))
    }

    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        let out = map_cpu_view!(x.cpu_view("permute")?, v => kernel::permute(v, x.dims(), perm));
        let shape: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
        Ok(Tensor::from_cpu(out, Shape::from(shape)))
    }
}
