//! Reductions: over everything (to a rank-0 tensor), over the last dimension, over rows.
//! Results stay on the device; read them with `to_scalar_f32` / `to_host_f32` (a sync).
//! Sums accumulate in f64 in a fixed order (see `cpu/reduce.rs`).

use crate::cpu::reduce as kernel;
use crate::cpu::softmax::logsumexp_row;
use crate::{Result, Shape, Tensor};

impl Tensor {
    /// Exclusive prefix sum of a rank-1 i32 tensor: `out[g] = Σ_{i<g} x[i]` (`[G]` i32),
    /// e.g. group offsets from group sizes. Errors if a partial sum leaves i32.
    pub fn exclusive_cumsum_i32(&self) -> Result<Tensor> {
        const OP: &str = "exclusive_cumsum_i32";
        self.expect_rank(OP, "x", 1)?;
        let x = self.cpu_i32(OP, "x")?;
        let mut acc = 0i32;
        let mut out = Vec::with_capacity(x.len());
        for &v in x {
            out.push(acc);
            acc = acc.checked_add(v).ok_or(crate::Error::InvalidArgument {
                op: OP,
                arg: "x",
                value: v.to_string(),
                rule: "partial sums must fit in i32",
            })?;
        }
        Ok(Tensor::cpu_i32_from(out, self.shape().clone()))
    }

    /// Euclidean norm of each row of `self [R, ..]` (trailing dims flattened): `[R]`, each
    /// entry the same bits as `self.narrow(0, r, 1).norm()` (f64 sum in the same pieces).
    pub fn norm_rows(&self) -> Result<Tensor> {
        const OP: &str = "norm_rows";
        let (&rows, rest) = self
            .dims()
            .split_first()
            .ok_or_else(|| self.rank_error(OP, "x", 1))?;
        let len: usize = rest.iter().product();
        let x = self.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::norm_rows(&x, len, rows),
            [rows],
        ))
    }

    /// Σ of all elements, as a rank-0 tensor (0 for an empty tensor).
    pub fn sum_all(&self) -> Result<Tensor> {
        let x = self.cpu_f32("sum_all", "x")?;
        Ok(Tensor::cpu_f32_from(
            vec![kernel::sum_all(&x, |v| v as f64) as f32],
            Shape::from(Vec::new()),
        ))
    }

    /// Mean of all elements, as a rank-0 tensor (NaN for an empty tensor).
    pub fn mean_all(&self) -> Result<Tensor> {
        let x = self.cpu_f32("mean_all", "x")?;
        let mean = kernel::sum_all(&x, |v| v as f64) / x.len() as f64;
        Ok(Tensor::cpu_f32_from(
            vec![mean as f32],
            Shape::from(Vec::new()),
        ))
    }

    /// Σ xᵢ² of all elements, as a rank-0 tensor.
    pub fn sum_squares(&self) -> Result<Tensor> {
        let x = self.cpu_f32("sum_squares", "x")?;
        let s = kernel::sum_all(&x, |v| (v as f64) * (v as f64));
        Ok(Tensor::cpu_f32_from(
            vec![s as f32],
            Shape::from(Vec::new()),
        ))
    }

    /// Euclidean norm √(Σ xᵢ²) of all elements, as a rank-0 tensor.
    pub fn norm(&self) -> Result<Tensor> {
        let x = self.cpu_f32("norm", "x")?;
        let s = kernel::sum_all(&x, |v| (v as f64) * (v as f64));
        Ok(Tensor::cpu_f32_from(
            vec![s.sqrt() as f32],
            Shape::from(Vec::new()),
        ))
    }

    fn reduce_last(
        &self,
        op: &'static str,
        f: impl Fn(&[f32]) -> f32 + Sync + Send,
    ) -> Result<Tensor> {
        let (lead, h) = match self.dims().split_last() {
            Some((&h, lead)) => (lead.to_vec(), h),
            None => return Err(self.rank_error(op, "x", 1)),
        };
        let rows: usize = lead.iter().product();
        let x = self.cpu_f32(op, "x")?;
        Ok(Tensor::cpu_f32_from(
            kernel::rows_reduce(&x, h, rows, f),
            lead,
        ))
    }

    /// Σ over the last dimension: `[.., H] → [..]`.
    pub fn sum_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("sum_last_dim", |r| {
            r.iter().map(|&v| v as f64).sum::<f64>() as f32
        })
    }

    /// Mean over the last dimension: `[.., H] → [..]`.
    pub fn mean_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("mean_last_dim", |r| {
            (r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64) as f32
        })
    }

    /// Max over the last dimension: `[.., H] → [..]` (−∞ for H = 0; NaN-ignoring).
    pub fn max_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("max_last_dim", |r| {
            r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
        })
    }

    /// `log Σ exp` over the last dimension: `[.., H] → [..]`, computed stably in f64.
    pub fn logsumexp_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("logsumexp_last_dim", |r| logsumexp_row(r) as f32)
    }

    /// Σ over rows: `[N, .., H] → [H]` (every leading dimension summed; bias gradients).
    pub fn sum_rows(&self) -> Result<Tensor> {
        const OP: &str = "sum_rows";
        let h = match self.dims().last() {
            Some(&h) => h,
            None => return Err(self.rank_error(OP, "x", 1)),
        };
        let rows = self.numel().checked_div(h).unwrap_or(0);
        let x = self.cpu_f32(OP, "x")?;
        Ok(Tensor::cpu_f32_from(kernel::sum_rows(&x, h, rows), [h]))
    }
}
