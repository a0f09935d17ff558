//! [`ReduceKernels`] on the CPU.

use crate::backend::CpuBackend;
use crate::cpu::reduce as kernel;
use crate::cpu::softmax::logsumexp_row;
use crate::ops::reduce::{ReduceAll, ReduceKernels, ReduceLast};
use crate::{Error, Result, Shape, Tensor};

impl ReduceKernels for CpuBackend {
    fn reduce_all(&self, x: &Tensor, op: ReduceAll) -> Result<Tensor> {
        let name = match op {
            ReduceAll::Sum => "sum_all",
            ReduceAll::Mean => "mean_all",
            ReduceAll::SumSquares => "sum_squares",
            ReduceAll::Norm => "norm",
        };
        let v = x.cpu_f32(name, "x")?;
        let r = match op {
            ReduceAll::Sum => kernel::sum_all(&v, |v| v as f64),
            ReduceAll::Mean => kernel::sum_all(&v, |v| v as f64) / v.len() as f64,
            ReduceAll::SumSquares => kernel::sum_all(&v, |v| (v as f64) * (v as f64)),
            ReduceAll::Norm => kernel::sum_all(&v, |v| (v as f64) * (v as f64)).sqrt(),
        };
        Ok(Tensor::cpu_f32_from(
            vec![r as f32],
            Shape::from(Vec::new()),
        ))
    }

    fn reduce_last(&self, x: &Tensor, op: ReduceLast) -> Result<Tensor> {
        let (lead, h) = match x.dims().split_last() {
            Some((&h, lead)) => (lead.to_vec(), h),
            None => return Err(x.rank_error("reduce_last", "x", 1)),
        };
        let rows: usize = lead.iter().product();
        let v = x.cpu_f32("reduce_last", "x")?;
        let out = match op {
            ReduceLast::Sum => kernel::rows_reduce(&v, h, rows, |r| {
                r.iter().map(|&v| v as f64).sum::<f64>() as f32
            }),
            ReduceLast::Mean => kernel::rows_reduce(&v, h, rows, |r| {
                (r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64) as f32
            }),
            ReduceLast::Max => kernel::rows_reduce(&v, h, rows, |r| {
                r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
            }),
            ReduceLast::LogSumExp => kernel::rows_reduce(&v, h, rows, |r| logsumexp_row(r) as f32),
        };
        Ok(Tensor::cpu_f32_from(out, lead))
    }

    fn sum_rows(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.dims().last().copied().unwrap_or(1);
        let rows = x.numel().checked_div(h).unwrap_or(0);
        let v = x.cpu_f32("sum_rows", "x")?;
        Ok(Tensor::cpu_f32_from(kernel::sum_rows(&v, h, rows), [h]))
    }

    fn norm_rows(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dims().first().copied().unwrap_or(1);
        let len: usize = x.dims().iter().skip(1).product();
        let v = x.cpu_f32("norm_rows", "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::norm_rows(&v, len, rows),
            [rows],
        ))
    }

    fn exclusive_cumsum_i32(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "exclusive_cumsum_i32";
        let v = x.cpu_i32(OP, "x")?;
        let mut acc = 0i32;
        let mut out = Vec::with_capacity(v.len());
        for &g in v {
            out.push(acc);
            acc = acc.checked_add(g).ok_or(Error::InvalidArgument {
                op: OP,
                arg: "x",
                value: g.to_string(),
                rule: "partial sums must fit in i32",
            })?;
        }
        Ok(Tensor::cpu_i32_from(out, x.shape().clone()))
    }
}
